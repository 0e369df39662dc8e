"""The plain-write probe (audit/cpu_files.py, CPU-UNPROTECTED-FILE): a card that takes UPDATE BINARY without a MAC
is reported with the files it let the audit forge and is left with its own bytes; a genuine card is not reported
and not changed, on a simulated card, on an audited card image and through pcscd + vpcd."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import SLOT_01, ServedCard, files_of, new_card, new_state, seeded_rng

from audit.chips import SimulatedCpu
from audit.cpu_audit import KeySource, audit_cpu
from audit.cpu_files import TARGETS, plain_write_probe
from audit.findings import CHIP_RULES, Severity
from cardsim import commands
from cardsim.apdu import split_response
from cardsim.image import load_purse, save_card
from cardsim.keys import IssuerKeyStore
from cardsim.purse import AID, BINARY_FILES, SFI_HOLDER, Defect, PurseCard
from terminals.pcsc import PcscReader, list_readers
from terminals.reader import InProcessReader, Reader

PLAIN_WRITE = frozenset({Defect.PLAIN_WRITE})
NAMES = ["SFI 15 expiry date", "SFI 16 card class", "SFI 17 card class"]


def read_files(reader: Reader) -> list[bytes]:
    """SFI 15, 16 and 17 read through ``reader`` (after a power-up and SELECT)."""
    reader.connect()
    assert split_response(reader.transmit(commands.select(AID)))[1] == 0x9000
    read = [split_response(reader.transmit(commands.read_binary(sfi))) for sfi in BINARY_FILES]
    assert all(sw == 0x9000 for _, sw in read)
    return [data for data, _ in read]


def test_a_plain_write_card_is_reported_critical_and_left_with_its_own_files() -> None:
    state = new_state()
    state.defects = PLAIN_WRITE
    original = files_of(state)
    reader = SimulatedCpu(PurseCard(state, seeded_rng()), "card")
    result = audit_cpu(reader, [KeySource("test keys", IssuerKeyStore.test_set(), True)], active=True, rig=reader)
    [found] = [f for f in result.findings if f.id == "CPU-UNPROTECTED-FILE"]
    assert found.severity is Severity.CRITICAL is CHIP_RULES["CPU-UNPROTECTED-FILE"].severity
    assert found.details == {"files": NAMES, "restored": True}
    # the trace is this probe's own: a power-up, SELECT, then the read of SFI 15
    assert found.evidence[0] == "power on" and found.evidence[1].startswith("> 00A4040008A000000632010105  < 6F")
    assert found.evidence[2].startswith("> 00B0950000  < ")
    evidence = "\n".join(found.evidence)
    assert "plain UPDATE BINARY of SFI 16 card class (offset 0) 01 -> 02 answered 9000, no MAC" in evidence
    assert "SFI 15 expiry date (offset 24) 20360101 -> 20991231 answered 9000" in evidence
    assert "> 00D696000102  < 9000" in evidence and "> 04D6" not in evidence  # the APDUs: plain 00 D6, no MAC
    assert evidence.count("put back with a plain write (9000): the original bytes read again") == 3
    assert files_of(state) == original  # the audit's purchases and loads touch no file


def test_a_genuine_card_refuses_every_plain_write_and_is_not_changed() -> None:
    card = new_card()
    original = files_of(card.state)
    reader = InProcessReader(card)
    result = plain_write_probe(reader)
    assert (result.written, result.evidence, result.skipped, result.restored) == ([], [], [], True)
    assert files_of(card.state) == original
    reader.connect()
    reader.transmit(commands.select(AID))
    assert reader.transmit(commands.update_binary(SFI_HOLDER, 0, b"\x02")) == b"\x69\x82"


def test_a_student_card_is_forged_to_another_class() -> None:
    card = new_card()
    card.state.defects = PLAIN_WRITE
    card.state.holder_data = b"\x02" + card.state.holder_data[1:]
    result = plain_write_probe(InProcessReader(card))
    assert any("SFI 16 card class (offset 0) 02 -> 03" in line for line in result.evidence)
    assert card.state.holder_data[0] == 0x02
    assert [t.value_for(t.forged[0]) for t in TARGETS] == [t.forged[1] for t in TARGETS]


def test_a_write_that_cannot_be_put_back_is_said_so() -> None:
    card = new_card()
    card.state.defects = PLAIN_WRITE
    writes = 0

    class OneWayOnly(InProcessReader):
        """The card takes the first plain write to a file and refuses the rest (as if it ran out of tries)."""

        def transmit(self, apdu: bytes) -> bytes:
            nonlocal writes
            if apdu[:2] == b"\x00\xd6":
                writes += 1
                if writes > 1:
                    return b"\x69\x82"
            return super().transmit(apdu)

    result = plain_write_probe(OneWayOnly(card))
    assert result.written == NAMES[:1] and not result.restored
    assert any(
        line.startswith("SFI 15 expiry date NOT restored: the write back answered 6982") for line in result.evidence
    )


def test_a_short_file_is_skipped_and_said_so() -> None:
    card = new_card()
    card.state.defects = PLAIN_WRITE
    card.state.interop_data = bytes(8)  # no card class byte at offset 10
    result = plain_write_probe(InProcessReader(card))
    assert result.written == NAMES[:2]
    assert result.skipped == ["SFI 17 card class: READ BINARY answered 9000 with 8 bytes"]


@pytest.mark.parametrize(
    ("defects", "read_back", "skipped"),
    [
        (
            frozenset(),
            b"\x6f\x00",
            "SFI 16 card class: plain UPDATE BINARY answered 6982, the read back 6F00 (0 bytes)",
        ),
        (frozenset(), b"\x01\x65\x81", "answered 6982, the read back 6581 (1 bytes)"),  # data, but not 9000
        (
            PLAIN_WRITE,
            b"\x6a\x82",
            "answered 9000, the read back 6A82 (0 bytes); the original bytes written back (9000)",
        ),
    ],
    ids=["genuine-error", "genuine-data-and-error", "flawed-error"],
)
def test_a_read_back_that_fails_is_skipped_not_taken_for_a_forged_file(
    defects: frozenset[Defect], read_back: bytes, skipped: str
) -> None:
    card = new_card()
    card.state.defects = defects
    original = files_of(card.state)
    after_write = False

    class FailingReadBack(InProcessReader):
        """The card answers ``read_back`` to the READ BINARY of SFI 16 that follows a write to it."""

        def transmit(self, apdu: bytes) -> bytes:
            nonlocal after_write
            if apdu[:3] == b"\x00\xd6\x96":
                after_write = True
            elif apdu[:3] == b"\x00\xb0\x96" and after_write:
                after_write = False
                return read_back
            return super().transmit(apdu)

    result = plain_write_probe(FailingReadBack(card))
    assert result.written == (NAMES[::2] if defects else [])  # SFI 16 not judged; the other two as they are
    assert len(result.skipped) == 1 and result.skipped[0].endswith(skipped), result.skipped
    assert files_of(card.state) == original


def test_the_cli_audits_a_copy_and_leaves_the_card_image_unchanged(tmp_path: Path) -> None:
    state = new_state()
    state.defects = PLAIN_WRITE
    image = tmp_path / "cards" / "card.json"
    image.parent.mkdir()
    save_card(image, state)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    done = subprocess.run(
        [sys.executable, "-m", "yikatong.cli", "audit", "chips", "--cards", str(image.parent), "--active"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    doc = json.loads((tmp_path / "audit-chips.json").read_text())
    assert "CPU-UNPROTECTED-FILE" in {f["id"] for f in doc["findings"]}
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest


@pytest.mark.pcsc
@pytest.mark.parametrize("defects", [PLAIN_WRITE, frozenset()], ids=["plain-write", "genuine"])
def test_through_pcscd_and_vpcd_the_card_keeps_its_files(tmp_path: Path, defects: frozenset[Defect]) -> None:
    name, port = SLOT_01
    assert name in list_readers(), "run scripts/services.sh to start pcscd with vpcd"
    state = new_state()
    state.defects = defects
    image = tmp_path / "card.json"
    save_card(image, state)
    with ServedCard(image, "--port", port):
        reader = PcscReader(name)
        reader.wait_for_card(timeout=20)
        before = read_files(reader)
        result = plain_write_probe(reader)
        after = read_files(reader)
        reader.disconnect()
    assert before == files_of(state) and after == before
    assert result.written == (NAMES if defects else []) and result.restored
    assert files_of(load_purse(image)) == before  # what the served card saved
