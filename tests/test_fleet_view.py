"""The fleet view (issue 20 item 5): the chip maker read back from the card (block 0 or SAK of M1 cards, the ATR of
CPU cards), the view's counts, shares and replace-first order on a small known fleet, its table and chart in the
HTML report, the city of M1 cards whose block 1 stays unread, and ``card issue --chip-maker``."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest

from audit.chip_makers import cpu_maker, historical_bytes, m1_maker, read_block0
from audit.chips import SimulatedCpu, audit_fleet
from audit.cpu_audit import KeySource, audit_cpu
from audit.findings import Report, finding
from audit.fleet import FleetError, fleet_view, generate_fleet
from audit.html import render_html
from cardsim.apdu import contactless_atr
from cardsim.crypto import Algorithm
from cardsim.image import load_card
from cardsim.issue_options import CPU_CHIP_MAKERS, M1_CHIP_MAKERS
from cardsim.keys import IssuerKeyStore
from cardsim.m1_issue import KeyScheme, issue_m1_card
from cardsim.mifare import DEFAULT_KEY, M1Card, M1State, Profile
from cardsim.personalise import CardRequest, issue_cpu_card
from cardsim.purse import PurseCard
from cardsim.resources import fixture_path
from terminals.m1 import FrameSlot
from yikatong.cli import main

# (company, country, chip) each maker's card must read back as
M1_EXPECTED = {
    "nxp": ("NXP", "Netherlands", "MF1ICS5005"),
    "fudan-fm11rf08": ("Fudan Microelectronics", "China", "FM11RF08"),
    "fudan-fm11rf08s": ("Fudan Microelectronics", "China", "FM11RF08S"),
    "infineon": ("Infineon", "Germany", "SLE66R35"),
    None: ("Fudan Microelectronics", "China", "FM11RF08 family"),
}
DEFAULT_SLOTS = {(0, 0x60): DEFAULT_KEY, (0, 0x61): DEFAULT_KEY}


def test_every_issuable_m1_maker_has_a_reading() -> None:
    assert set(M1_EXPECTED) - {None} == set(M1_CHIP_MAKERS)


@pytest.mark.parametrize("maker", list(M1_EXPECTED))
def test_m1_maker_read_back_from_block_0(maker: str | None) -> None:
    """Issued with a maker, the card answers that maker's block 0 through a session with its sector-0 key."""
    state = issue_m1_card(bytes.fromhex("1A2B3C4D"), Profile.GENUINE, KeyScheme.DEFAULT, 100, bytes(16), "4560", maker)
    chip = M1Card(state, os.urandom)
    chip.power_on()
    _, sak, atqa = chip.anticollision()
    block0 = read_block0(FrameSlot(chip), DEFAULT_SLOTS)
    assert block0 is not None and block0[:4] == bytes.fromhex("1A2B3C4D")
    read = m1_maker(block0, sak, atqa)
    assert (read.company, read.country, read.chip) == M1_EXPECTED[maker]
    assert read.domestic == (read.country == "China")
    assert block0[5:].hex(" ").upper() in read.evidence


@pytest.mark.parametrize("maker", list(M1_CHIP_MAKERS))
def test_m1_maker_without_block_0_goes_by_the_sak(maker: str) -> None:
    """No sector-0 key: only Infineon's SAK 88 names a maker; the rest are unknown and say why."""
    state = issue_m1_card(
        bytes.fromhex("1A2B3C4D"), Profile.HARDENED, KeyScheme.DIVERSIFIED, 1, bytes(16), "4510", maker
    )
    chip = M1Card(state, os.urandom)
    _, sak, atqa = chip.anticollision()
    assert read_block0(FrameSlot(chip), DEFAULT_SLOTS) is None, "a wrong key reads nothing"
    read = m1_maker(None, sak, atqa)
    if maker == "infineon":
        assert (read.company, read.country) == ("Infineon", "Germany")
    else:
        assert not read.known and read.label == "unknown" and "block 0 not read" in read.evidence


def test_m1_maker_on_real_nxp_block_0() -> None:
    """A real NXP chip stores SAK 88 in block 0 and answers 08 (Proxmark3 hf mf info's fingerprint)."""
    block0 = bytes.fromhex("B1C2D3E4 44 88 0400 C0 00000000000000")
    read = m1_maker(block0, 0x08, bytes.fromhex("0400"))
    assert (read.company, read.chip) == ("NXP", "MF1ICS5035")
    unknown = m1_maker(bytes.fromhex("B1C2D3E4 44 08 0400 00 00000000000000"), 0x08, bytes.fromhex("0400"))
    assert not unknown.known and "match no maker" in unknown.evidence


@pytest.mark.parametrize(
    ("atr", "company", "country"),
    [
        ("3B8B800120900000000000B0AC2842CC", "Fudan Microelectronics", "China"),  # FM1208 (smartcard_list)
        ("3B8B80012090000000000015C0477A52", "Fudan Microelectronics", "China"),  # FM12080
        ("3B8A80014A434F503431563232317F", "NXP", "Netherlands"),  # JCOP41 contactless
        ("3B878001774332540009015C", "Infineon", "Germany"),  # CIPURSE transport
        (contactless_atr(bytes.fromhex("813F017511010281010A")).hex(), "CEC Huada Electronic Design", "China"),
    ],
)
def test_cpu_maker_from_atr_historical_bytes(atr: str, company: str, country: str) -> None:
    read = cpu_maker(bytes.fromhex(atr))
    assert (read.company, read.country) == (company, country) and read.evidence.startswith("ATR historical bytes")


def test_historical_bytes_follow_the_interface_bytes() -> None:
    """T0 and each TDi announce interface bytes; the historical bytes come after them (a contact Huada ATR)."""
    assert historical_bytes(bytes.fromhex("3B6A0000813F017511010281010A")) == bytes.fromhex("813F017511010281010A")
    assert historical_bytes(bytes.fromhex("3B8B800120900000000000B0AC2842CC"))[:2] == bytes.fromhex("2090")
    for bad in ("", "3B", "00", "3B8F8001"):
        read = cpu_maker(bytes.fromhex(bad))
        assert not read.known and f"ATR {bad.upper()}" in read.evidence


CPU_EXPECTED = {
    "fudan-fm1208": ("Fudan Microelectronics", "China", "FM1208"),
    "huada-ciu": ("CEC Huada Electronic Design", "China", "CIU98 series"),
    "nxp-jcop": ("NXP", "Netherlands", "JCOP"),
    "infineon-cipurse": ("Infineon", "Germany", "SLS 32 (CIPURSE)"),
}


@pytest.mark.parametrize("maker", [*CPU_CHIP_MAKERS, None])
def test_cpu_audit_reads_the_maker_from_the_atr(maker: str | None) -> None:
    """Issued with a maker, the card's ATR carries that maker's historical bytes and the audit names it; the
    simulator's own ATR ('YIKATONG') names none, and the report says what it read."""
    keys = IssuerKeyStore.test_set()
    request = CardRequest("4510", Algorithm.SM4, 100, 1, dt.date(2026, 1, 1), dt.date(2036, 1, 1), chip_maker=maker)
    reader = SimulatedCpu(PurseCard(issue_cpu_card(keys, request), os.urandom), "cpu")
    result = audit_cpu(reader, [KeySource("test", keys, True)], active=False)
    assert result.maker is not None
    if maker is None:
        assert not result.maker.known and "'YIKATONG'" in result.maker.evidence
    else:
        assert (result.maker.company, result.maker.country, result.maker.chip) == CPU_EXPECTED[maker]


SMALL_FLEET = {
    "schema": "yikatong.fleet/1",
    "keys": str(fixture_path("keys/fleet-keys.json")),
    "seed": 7,
    "cards": [
        {"name": "jinan-sm4", "tech": "cpu", "city": "4510", "alg": "sm4", "maker": "huada-ciu"},
        {
            "name": "jinan-nxp",
            "tech": "m1",
            "city": "4510",
            "maker": "nxp",
            "profile": "hardened",
            "m1_keys": "default",
        },
        {"name": "yantai-3des", "tech": "cpu", "city": "4560", "alg": "3des"},
        {"name": "yantai-infineon", "tech": "m1", "city": "4560", "maker": "infineon", "profile": "hardened"},
        {
            "name": "yantai-fudan",
            "tech": "m1",
            "city": "4560",
            "maker": "fudan-fm11rf08",
            "profile": "hardened",
            "m1_keys": "default",
        },
        {"name": "zibo-des", "tech": "cpu", "city": "4530", "alg": "des"},
    ],
}


@pytest.fixture(scope="module")
def small_report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    path = tmp_path_factory.mktemp("fleet") / "small.json"
    path.write_text(json.dumps(SMALL_FLEET))
    fleet = generate_fleet(path)
    keys = fleet.issuer_keys
    assert keys is not None
    sources = [KeySource("test", IssuerKeyStore.test_set(), True), KeySource("issuer", keys, False)]
    return audit_fleet(fleet.cards, sources, [str(path)], active=False)


def _names(report: Report) -> dict[str, str]:
    return {str(s["subject"]): str(s["source"]) for s in report.subjects}


def test_fleet_view_counts_and_shares(small_report: Report) -> None:
    view = fleet_view(small_report.subjects, small_report.findings).to_json()
    assert json.loads(json.dumps(small_report.to_json()))["fleet"] == view, "the JSON report carries the view"
    cities = view["cities"]
    assert isinstance(cities, dict) and list(cities) == ["4510", "4530", "4560"]
    assert cities["4510"] == {
        "cards": 2,
        "tech": {"cpu": 1, "m1": 1},
        "algorithm": {"M1 Crypto-1": 1, "CPU SM4": 1},
        "maker": {"CEC Huada Electronic Design CIU98 series (China)": 1, "NXP MF1ICS5005 (Netherlands)": 1},
        "domestic_chip": 1,
        "foreign_chip": 1,
        "unknown_chip": 0,
        "domestic_algorithm": 1,
        "domestic_chip_share": 0.5,
        "domestic_algorithm_share": 0.5,
    }
    yantai = cities["4560"]
    assert isinstance(yantai, dict)
    assert yantai["maker"] == {
        "Fudan Microelectronics FM11RF08 (China)": 1,
        "Infineon MIFARE Classic 1K (Germany)": 1,
        "unknown": 1,
    }
    assert (yantai["cards"], yantai["domestic_chip"], yantai["foreign_chip"], yantai["domestic_algorithm"]) == (
        3,
        1,
        1,
        0,
    )
    assert yantai["domestic_chip_share"] == 0.3333
    total = view["total"]
    assert isinstance(total, dict)
    assert (total["cards"], total["domestic_chip_share"], total["domestic_algorithm_share"]) == (6, 0.3333, 0.1667)


def test_replace_first_by_worst_finding_then_key_speed(small_report: Report) -> None:
    names = _names(small_report)
    order = [names[c.subject] for c in fleet_view(small_report.subjects, small_report.findings).replace_first]
    # two cards open with dictionary keys (critical, 0 s; then by UID), Crypto-1 alone (high), single DES (medium);
    # the SM4 (pass) and 3DES (info) cards are not on the list
    assert sorted(order[:2]) == ["jinan-nxp", "yantai-fudan"] and order[2:] == ["yantai-infineon", "zibo-des"]


def test_replace_first_orders_equal_findings_by_seconds() -> None:
    """Of two cards whose keys an attack recovered, the one that fell faster comes first; no key fell: last."""
    subjects = [{"subject": s, "city": "4510", "tech": "m1", "algorithm": "crypto-1"} for s in ("AA", "BB", "CC")]
    findings = [
        finding("M1-KEY-RECOVERED", "AA", "m1", "4510", ["slow"], seconds=3.5),
        finding("M1-KEY-RECOVERED", "BB", "m1", "4510", ["fast"], seconds=0.25),
        finding("M1-KEY-RECOVERED", "BB", "m1", "4510", ["slower"], seconds=9.0),
        finding("M1-MAGIC", "CC", "m1", "4510", ["gen1a"]),
    ]
    view = fleet_view(subjects, findings)
    assert [(c.subject, c.key_seconds) for c in view.replace_first] == [("BB", 0.25), ("AA", 3.5), ("CC", None)]


def test_m1_city_from_block_1_or_the_issuer_record(small_report: Report) -> None:
    """A card whose sector-0 key is known shows the city of its block 1; the others the issuer's record, said so;
    its findings carry the city too (no 'M1 · no city' row in the chart)."""
    names = _names(small_report)
    by_name = {names[str(s["subject"])]: s for s in small_report.subjects}
    assert (by_name["jinan-nxp"]["city"], by_name["jinan-nxp"]["city from"]) == ("4510", "card (block 1)")
    infineon = by_name["yantai-infineon"]
    assert infineon["city"] == "4560" and str(infineon["city from"]).startswith("issuer record")
    assert all(f.city for f in small_report.findings)


def test_report_html_has_the_fleet_table_and_chart(small_report: Report) -> None:
    page = render_html(small_report)
    section = page[page.index('<section id="fleet">') :]
    section = section[: section.index("</section>")]
    assert "<table>" in section and "on domestic chips" in section and "<svg" in section
    assert 'id="fleet-chart-title"' in section and "4560 · chip" in section and "4510 · algorithm" in section
    assert '<span data-share="domestic-chip">33%</span>' in section  # the whole fleet: 2 of 6
    assert '<span data-share="domestic-algorithm">50%</span>' in section  # Jinan: 1 of 2 on SM4
    replace = section[section.index("Cards to replace first") :]
    uids = {str(s["source"]): str(s["subject"]) for s in small_report.subjects}
    assert replace.index(uids["yantai-infineon"]) < replace.index(uids["zibo-des"])
    assert uids["jinan-sm4"] not in replace


def test_fleet_file_maker_errors(tmp_path: Path) -> None:
    for card, message in [
        ({"name": "x", "tech": "m1", "city": "4510", "maker": "nokia"}, "'maker' must be one of nxp"),
        ({"name": "x", "tech": "cpu", "city": "4510", "alg": "sm4", "maker": "nxp"}, "'maker' must be one of fudan"),
    ]:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({**SMALL_FLEET, "cards": [card]}))
        with pytest.raises(FleetError, match=message):
            generate_fleet(path)


def test_card_issue_chip_maker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m1.json"
    base = ["card", "issue", "--tech", "m1", "--city", "4530", "--balance", "100", "--uid", "0A0B0C0D"]
    assert main([*base, "--chip-maker", "fudan-fm11rf08s", "--out", str(out)]) == 0
    assert "Fudan FM11RF08S (China)" in capsys.readouterr().out
    state = load_card(out)
    assert isinstance(state, M1State)
    block0 = state.blocks[0]
    assert m1_maker(block0, block0[5], block0[6:8]).chip == "FM11RF08S"
    assert main(["card", "show", str(out)]) == 0
    assert "Maker     Fudan Microelectronics FM11RF08S (China): block 0" in capsys.readouterr().out
    assert main(["card", "issue", "--help"]) == 0
    helptext = " ".join(capsys.readouterr().out.split())
    assert (
        "--chip-maker {fudan-fm1208,huada-ciu,nxp-jcop,infineon-cipurse,nxp,fudan-fm11rf08,fudan-fm11rf08s,infineon}"
        in helptext
    )
    assert main([*base, "--chip-maker", "nokia", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nokia'" in err and "'fudan-fm11rf08s'" in err
    cpu = ["card", "issue", "--city", "4510", "--alg", "sm4", "--balance", "1", "--chip-maker"]
    assert main([*cpu, "nxp", "--out", str(tmp_path / "cpu.json")]) == 2
    assert "--chip-maker nxp makes M1 chips; a CPU card's is one of fudan-fm1208" in capsys.readouterr().err
    assert main([*base, "--chip-maker", "huada-ciu", "--out", str(tmp_path / "x.json")]) == 2
    assert "--chip-maker huada-ciu makes CPU chips; an M1 card's is one of nxp" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "cpu.json").exists()
    assert main([*cpu, "fudan-fm1208", "--out", str(tmp_path / "cpu.json")]) == 0
    cpu_state = load_card(tmp_path / "cpu.json")
    assert not isinstance(cpu_state, M1State)
    assert cpu_maker(PurseCard(cpu_state, os.urandom).power_on()).chip == "FM1208", "the image keeps the maker"
