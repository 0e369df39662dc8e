"""The chip audit of M1 cards through readers: a PC/SC Part 3 reader (in process, and pcscd + vpcd: the checks
it permits) and an emulated PN532 on a pty (raw frames: every check, nested key recovery included)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ServedCard
from test_part3 import ScriptedReader
from test_pn532 import serve_image

from audit.m1_audit import audit_m1_blocks
from cardsim.image import load_card, save_card
from cardsim.m1_issue import KeyScheme, issue_m1_card, sector_keys
from cardsim.mifare import M1State, Profile
from terminals.part3 import Part3Slot
from terminals.pcsc import PcscReader, list_readers
from terminals.reader import InProcessReader

READER = "Virtual PCD 00 00"
UID = bytes.fromhex("5A6B7C8D")
MASTER = bytes(range(16))


def audit(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    """``yikatong audit chips ARGS --out DIR``: the finished command and its JSON report."""
    report = tmp_path / "audit-chips.json"
    html = tmp_path / "audit-chips.html"
    done = subprocess.run(
        [sys.executable, "-m", "yikatong.cli", "audit", "chips", *args, "--json", str(report), "--html", str(html)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.exists(), done.stdout + done.stderr
    return done, json.loads(report.read_text())


class RecordingReader(ScriptedReader):
    """A Part 3 reader that keeps every APDU it is sent and refuses (63 00) the ``fail``-th GENERAL AUTHENTICATE
    (FF 86) to ``block`` with key A, as a card at the edge of the field does now and then."""

    def __init__(self, state: M1State, d7: bytes | None = None, block: int = 0, fail: int = 0) -> None:
        super().__init__(state, d7=d7)
        self.apdus: list[bytes] = []
        self.block, self.fail, self.auths = block, fail, 0

    def transmit(self, apdu: bytes) -> bytes:
        self.apdus.append(apdu)
        if self.fail and apdu[:2] == b"\xff\x86" and apdu[7:9] == bytes([self.block, 0x60]):
            self.auths += 1
            if self.auths == self.fail:
                return b"\x63\x00"
        return super().transmit(apdu)


def part3_audit(reader: RecordingReader) -> tuple[set[str], list[str]]:
    """audit_m1_blocks as ``audit chips --reader`` runs it: (finding ids, skipped lines)."""
    result = audit_m1_blocks(Part3Slot(InProcessReader(reader)), "a Part 3 reader", "ATR ...: PC/SC Part 3")
    return {f.id for f in result.findings}, result.skipped


@pytest.mark.parametrize("d7", [None, "6D00", "6A81"])
def test_part3_audit_sends_no_value_command_and_audits_on_a_reader_without_ff_d7(d7: str | None) -> None:
    state = issue_m1_card(UID, Profile.GENUINE, KeyScheme.DEFAULT, 1500, MASTER, city="4510")
    before = list(state.blocks)
    reader = RecordingReader(state, d7=None if d7 is None else bytes.fromhex(d7))
    found, _ = part3_audit(reader)
    assert found == {"M1-CRYPTO1", "M1-DEFAULT-KEY"}
    assert not [apdu for apdu in reader.apdus if apdu[:2] == b"\xff\xd7"]  # a passive audit: no DECREMENT
    assert state.blocks == before


def test_a_trailer_authentication_that_fails_once_is_skipped_not_taken_for_broken_access_bits() -> None:
    state = issue_m1_card(UID, Profile.GENUINE, KeyScheme.DEFAULT, 1500, MASTER, city="4510")
    # key A of sector 2: found by the dictionary (1st authentication), refused when the trailer is read (2nd)
    reader = RecordingReader(state, block=11, fail=2)
    found, skipped = part3_audit(reader)
    assert "M1-ACCESS-BITS" not in found and reader.auths >= 2
    assert [line for line in skipped if "trailer of sector 2 not read" in line and "63 00" in line]
    # the same refusal after a successful authentication is the finding
    state.blocks[11] = state.blocks[11][:6] + bytes.fromhex("FFFFFFFF") + state.blocks[11][10:]
    found, _ = part3_audit(RecordingReader(state))
    assert "M1-ACCESS-BITS" in found


@pytest.mark.pcsc
def test_part3_reader_audit_runs_the_checks_it_permits_and_names_the_rest(tmp_path: Path) -> None:
    assert READER in list_readers(), "run scripts/services.sh to start pcscd with vpcd"
    state = issue_m1_card(UID, Profile.GENUINE, KeyScheme.DEFAULT, 1500, bytes(16), city="4510")
    state.blocks[5] = state.blocks[5][:4] + bytes(4) + state.blocks[5][8:]  # the backup's redundancy broken
    image = tmp_path / "m1.json"
    save_card(image, state)
    before = image.read_text()
    reader = PcscReader(READER)
    with ServedCard(image) as serve:
        reader.wait_for_card(timeout=20)
        done, report = audit(tmp_path, "--reader", READER, "--count", "1", "--wait", "20")
    assert reader.wait_for_removal(timeout=30), "pcscd still sees the M1 card after card serve stopped"
    assert serve.returncode == 0, serve.output
    assert done.returncode == 1, done.stderr  # critical findings
    found = {f["id"]: f for f in report["findings"]}  # type: ignore[attr-defined]
    assert set(found) == {"M1-CRYPTO1", "M1-DEFAULT-KEY", "M1-VALUE-BLOCK"}, found
    assert "PC/SC Part 3, MIFARE Classic 1K" in found["M1-CRYPTO1"]["evidence"][0]
    assert found["M1-VALUE-BLOCK"]["details"]["block"] == 5
    [subject] = report["subjects"]  # type: ignore[misc]
    assert (subject["subject"], subject["city"], subject["keys known"]) == (UID.hex().upper(), "4510", "32 of 32")
    [raw] = [line for line in report["skipped"] if "raw frames" in line]  # type: ignore[attr-defined]
    for check in ("M1-WEAK-PRNG", "M1-MAGIC", "M1-BACKDOOR-KEY", "M1-KEY-RECOVERED"):
        assert check in raw, raw
    assert image.read_text() == before  # the audit only reads, and block 0 refused its own bytes
    assert load_card(image) == state


def served_pn532(tmp_path: Path, state: M1State) -> Iterator[tuple[Path, str]]:
    """``card serve IMAGE --pn532`` (the emulated board on a pty) for the length of a test."""
    yield from serve_image(tmp_path, state)


def shared_card_with_a_default_sector() -> M1State:
    """A fleet-shared-key card whose sector 0 was left on the factory key (a common issuing slip)."""
    state = issue_m1_card(UID, Profile.GENUINE, KeyScheme.SHARED, 2000, MASTER, city="4560")
    trailer = state.blocks[3]
    state.blocks[3] = bytes.fromhex("FFFFFFFFFFFF") + trailer[6:10] + bytes.fromhex("FFFFFFFFFFFF")
    return state


def test_nested_attack_through_the_pn532_pty_recovers_a_key(tmp_path: Path) -> None:
    state = issue_m1_card(UID, Profile.GENUINE, KeyScheme.SHARED, 2000, MASTER, city="4560")
    known = sector_keys(KeyScheme.SHARED, MASTER, UID, 0)[0]
    target = sector_keys(KeyScheme.SHARED, MASTER, UID, 2)[1]
    for _, pty in served_pn532(tmp_path, state):
        done = subprocess.run(
            [sys.executable, "-m", "yikatong.cli", "audit", "nested", "--pn532", pty, "--known-block", "3",
             "--known-key", known.hex().upper(), "--target-block", "11", "--target-type", "B"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == target.hex().upper()


def test_chips_audit_on_the_pn532_runs_the_raw_frame_checks_and_recovers_the_purse_keys(tmp_path: Path) -> None:
    state = shared_card_with_a_default_sector()
    for image, pty in served_pn532(tmp_path, state):
        before = image.read_text()
        done, report = audit(tmp_path, "--pn532", pty, "--count", "1", "--wait", "20")
        assert done.returncode == 1, done.stderr
        found = {f["id"]: f for f in report["findings"]}  # type: ignore[attr-defined]
        assert {"M1-CRYPTO1", "M1-WEAK-PRNG", "M1-DEFAULT-KEY", "M1-KEY-RECOVERED"} <= set(found), found
        assert "ATQA 0004 SAK 08" in found["M1-CRYPTO1"]["evidence"][0]
        recovered = {
            (f["details"]["sector"], f["details"]["key_type"], f["details"]["key"])
            for f in report["findings"]  # type: ignore[attr-defined]
            if f["id"] == "M1-KEY-RECOVERED"
        }
        keys = sector_keys(KeyScheme.SHARED, MASTER, UID, 1)
        assert recovered == {(1, "A", keys[0].hex().upper()), (1, "B", keys[1].hex().upper())}
        [subject] = report["subjects"]  # type: ignore[misc]
        assert (subject["prng"], subject["city"]) == ("weak", "4560")
        assert not [line for line in report["skipped"] if "raw frames" in line]  # type: ignore[attr-defined]
        assert image.read_text() == before


def test_nested_needs_exactly_one_card_source(tmp_path: Path) -> None:
    for extra in ([], [str(tmp_path / "m1.json"), "--pn532", "/dev/null"]):
        done = subprocess.run(
            [sys.executable, "-m", "yikatong.cli", "audit", "nested", *extra, "--known-block", "3",
             "--known-key", "FFFFFFFFFFFF", "--target-block", "7"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2 and "not both" in done.stderr, done.stderr


def test_a_device_that_is_no_pn532_is_a_clear_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "yikatong.cli", "audit", "chips", "--pn532", str(tmp_path / "ttyNONE"),
         "--json", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "cannot open the serial port" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_autopwn_through_the_pn532_pty_breaks_a_card_with_no_default_key(tmp_path: Path) -> None:
    from test_autopwn import one_key_card

    state, key = one_key_card(Profile.GENUINE, 51, default_sector0=False)
    for _, pty in served_pn532(tmp_path, state):
        done = subprocess.run(
            [sys.executable, "-m", "yikatong.cli", "audit", "autopwn", "--pn532", pty, "--out", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "32 of 32 keys" in done.stdout and "darkside" in done.stdout
    uid = state.blocks[0][:4].hex().upper()
    assert (tmp_path / f"m1-{uid}-keys.dic").read_text() == f"{key:012X}\n"


@pytest.mark.pcsc
def test_autopwn_on_a_part3_reader_dumps_the_card_and_names_the_stages_it_cannot_run(tmp_path: Path) -> None:
    assert READER in list_readers(), "run scripts/services.sh to start pcscd with vpcd"
    state = issue_m1_card(UID, Profile.GENUINE, KeyScheme.DEFAULT, 1500, bytes(16), city="4510")  # pcscd is slow
    image = tmp_path / "m1.json"
    save_card(image, state)
    reader = PcscReader(READER)
    with ServedCard(image) as serve:
        reader.wait_for_card(timeout=20)
        done = subprocess.run(
            [sys.executable, "-m", "yikatong.cli", "audit", "autopwn", "--reader", READER, "--out", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert reader.wait_for_removal(timeout=30), "pcscd still sees the M1 card after card serve stopped"
    assert serve.returncode == 0, serve.output
    assert done.returncode == 0, done.stdout + done.stderr
    assert "32 of 32 keys" in done.stdout
    for stage in ("backdoor", "darkside", "nested / static nested / hardnested"):
        assert f"{stage}: skipped" in done.stdout and "passes no raw frames" in done.stdout, done.stdout
    assert (tmp_path / f"m1-{UID.hex().upper()}.mfd").read_bytes() == b"".join(state.blocks)  # read through Part 3
