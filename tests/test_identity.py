"""Who published (issue 18 item 3): terminals with a certificate sign each message (``yikatong.signed/1``), and
the clearing takes a terminal message only when a certificate of its city's CA signed exactly those bytes and
names the topic's terminal, which each record must name too. Any other message is quarantined whole with the
reason and acks nothing (its publisher is not the topic's terminal); broken envelopes never raise."""

from __future__ import annotations

import base64
import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from clearing_corpus import CITY, OTHER_TERMINAL, TERMINAL, good_records
from clearing_support import HOST, fresh_db, signed_records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clearing.db import migrate, open_engine
from clearing.identity import Identities, IdentityError
from clearing.intake import Accepted, Intake, Refused, Topic, Verdict
from clearing.ledger import Ledger, Received
from clearing.pki import Identity, Pki
from terminals.messages import MessageError, batch_payload, txn_topic
from terminals.mqtt import TlsFiles
from terminals.signing import SIGNED_PREFIX, Signer, unseal

EXPIRED, REVOKED = f"{CITY}0000EE01", f"{CITY}0000EE02"
ELSEWHERE = "45100000EE03"  # a terminal of another city (its city's CA)


@dataclass
class Network:
    pki: Pki
    foreign: Path  # TERMINAL's name, from another PKI

    def signer(self, who: Identity | Path) -> Signer:
        folder = who if isinstance(who, Path) else self.pki.folder / "devices" / who.folder
        return Signer.of(TlsFiles.folder(folder))

    def identities(self, **options: object) -> Identities:
        clearing = TlsFiles.folder(self.pki.folder / "devices" / Identity.clearing(CITY).folder)
        return Identities.of(CITY, clearing, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Network:
    top = tmp_path_factory.mktemp("identity")
    pki = Pki.create(top / "pki", [CITY, "4510"])
    for number in (TERMINAL, OTHER_TERMINAL, REVOKED, ELSEWHERE):
        pki.issue(Identity.terminal(number))
    pki.issue(Identity.clearing(CITY))
    pki.issue(Identity.server("127.0.0.1"))
    past = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    pki.issue(Identity.terminal(EXPIRED), not_before=past, not_after=past + dt.timedelta(days=30))
    _, foreign = Pki.create(top / "foreign", [CITY]).issue(Identity.terminal(TERMINAL))
    return Network(pki, foreign)


def _verdicts(intake: Intake, payload: str, terminal: str = TERMINAL) -> list[Verdict]:
    topic = Topic.parse(txn_topic(CITY, terminal), CITY)
    assert topic is not None
    return intake.message(topic, payload.encode(), frozenset())


def _refusal(verdicts: list[Verdict]) -> Refused:
    (refused,) = verdicts
    assert isinstance(refused, Refused), refused
    return refused


def _batch() -> str:
    return batch_payload([r.to_json() for r in good_records()])


def test_a_message_signed_by_the_topics_terminal_is_taken_whole(network: Network) -> None:
    intake = Intake(CITY, HOST, identities=network.identities())
    sealed = network.signer(Identity.terminal(TERMINAL)).seal(_batch())
    verdicts = _verdicts(intake, sealed)
    assert [type(v) for v in verdicts] == [Accepted] * 4
    assert [v.record for v in verdicts if isinstance(v, Accepted)] == good_records()


def test_unsigned_messages_are_refused_only_when_identities_are_required(network: Network) -> None:
    required = _refusal(_verdicts(Intake(CITY, HOST, identities=network.identities()), _batch()))
    assert required.reason.startswith("identity: unsigned") and required.seq is None
    lenient = Intake(CITY, HOST, identities=network.identities(required=False))
    assert all(isinstance(v, Accepted) for v in _verdicts(lenient, _batch()))


def test_a_clearing_without_the_network_ca_opens_the_envelope_unchecked(network: Network) -> None:
    sealed = network.signer(Identity.terminal(OTHER_TERMINAL)).seal(_batch())
    assert all(isinstance(v, Accepted) for v in _verdicts(Intake(CITY, HOST), sealed))


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        (
            Identity.terminal(OTHER_TERMINAL),
            f"certificate of terminal {OTHER_TERMINAL} on the topic of terminal {TERMINAL}",
        ),
        (Identity.terminal(EXPIRED), "not valid now"),
        (Identity.terminal(ELSEWHERE), f"not issued by the CA of city {CITY}"),
        (Identity.clearing(CITY), "names no terminal"),
        (Identity.server("127.0.0.1"), f"not issued by the CA of city {CITY}"),
        (None, "not issued under the network root"),
    ],
    ids=["other-terminal", "expired", "other-city", "clearing", "server", "foreign-ca"],
)
def test_a_message_signed_by_anyone_but_the_topics_terminal_is_quarantined_whole(
    network: Network, who: Identity | None, reason: str
) -> None:
    """(A certificate verified once is cached: the second message gets the same answer.)"""
    intake = Intake(CITY, HOST, identities=network.identities())
    sealed = network.signer(who or network.foreign).seal(_batch())
    for _ in range(2):
        refused = _refusal(_verdicts(intake, sealed))
        assert refused.reason.startswith("identity: ") and reason in refused.reason, refused.reason
        assert refused.seq is None and refused.raw == sealed.encode()


def test_a_record_of_another_terminal_signed_by_the_topics_terminal_is_rejected_by_seq(network: Network) -> None:
    """The signer owns the topic, so it is told: the record is acked as rejected (the topic-record check)."""
    intake = Intake(CITY, HOST, identities=network.identities())
    (record,) = signed_records(1, CITY, OTHER_TERMINAL, issuers=(CITY,), cards=1)
    refused = _refusal(_verdicts(intake, network.signer(Identity.terminal(TERMINAL)).seal(record.to_json())))
    assert refused.seq == 1 and f"record of terminal {OTHER_TERMINAL} published on the topic" in refused.reason


def test_a_signature_over_other_bytes_is_refused(network: Network) -> None:
    intake = Intake(CITY, HOST, identities=network.identities())
    signer = network.signer(Identity.terminal(TERMINAL))
    one, two = (r.to_json() for r in good_records()[:2])
    head, _, _ = signer.seal(one).rpartition('"payload":')
    swapped = f'{head}"payload":{two}}}'  # the certificate and signature of one record, on another
    assert "signature does not match the payload" in _refusal(_verdicts(intake, swapped)).reason


def test_a_revoked_certificate_signs_nothing_once_the_crl_says_so(network: Network, tmp_path: Path) -> None:
    crl = tmp_path / "crl.pem"
    shutil.copy(network.pki.folder / "crl.pem", crl)
    intake = Intake(CITY, HOST, identities=network.identities(crl=crl, crl_every=0.0))
    sealed = network.signer(Identity.terminal(REVOKED)).seal(good_records()[0].to_json())
    assert isinstance(_verdicts(intake, sealed, REVOKED)[0], Refused)  # another terminal's record on its topic
    (serial,) = [e.serial for e in network.pki.index() if e.subject == f"terminal:{REVOKED}"]
    network.pki.revoke(serial)
    shutil.copy(network.pki.folder / "crl.pem", crl)
    refused = _refusal(_verdicts(intake, sealed, REVOKED))
    assert f"certificate of terminal {REVOKED} revoked (serial {serial.lstrip('0')})" in refused.reason


def test_a_crl_file_without_the_city_cas_crl_is_refused_at_start(network: Network, tmp_path: Path) -> None:
    (tmp_path / "root-only.pem").write_bytes((network.pki.folder / "ca/root/crl.pem").read_bytes())
    with pytest.raises(IdentityError, match="no CRL of the city 4560 CA"):
        network.identities(crl=tmp_path / "root-only.pem")


def test_broken_envelopes_say_what_is_wrong() -> None:
    for broken in (SIGNED_PREFIX + b"}", SIGNED_PREFIX + b',"cert":"AA==","sig":"A","payload":{}}'):
        with pytest.raises(MessageError):
            unseal(broken)


async def test_an_identity_refusal_is_quarantined_with_its_reason_and_acks_nothing(
    network: Network, tmp_path: Path
) -> None:
    intake = Intake(CITY, HOST, identities=network.identities())
    forged = network.signer(Identity.terminal(OTHER_TERMINAL)).seal(_batch())
    honest = network.signer(Identity.terminal(TERMINAL)).seal(good_records()[0].to_json())
    async with fresh_db("sqlite", tmp_path) as url:
        engine = open_engine(url)
        await migrate(engine)
        ledger = Ledger(engine, CITY)
        topic = txn_topic(CITY, TERMINAL)
        received = [Received(topic, TERMINAL, _verdicts(intake, p), p.encode()) for p in (forged, honest)]
        outcome = await ledger.store(received)
        assert (outcome.stored, outcome.quarantined) == (1, 1)
        # the forged batch held seqs 1..4: only the honest record 1 is acked
        assert [(a.terminal, a.acked_through, a.rejected) for a in outcome.terminal_acks] == [(TERMINAL, 1, [])]
        ((reason, count),) = await ledger.quarantine_reasons()
        assert count == 1 and reason.startswith(f"identity: certificate of terminal {OTHER_TERMINAL} on the topic")
        await engine.dispose()


def _mutations(sealed: bytes) -> st.SearchStrategy[bytes]:
    """Broken copies of a signed message. Positions are drawn apart from its length (a signature's length varies
    from run to run, and hypothesis replays the examples it saved)."""
    at = st.integers(0, 2**16).map(lambda n: n % len(sealed))
    flip = st.tuples(at, st.integers(1, 255)).map(
        lambda f: sealed[: f[0]] + bytes([sealed[f[0]] ^ f[1]]) + sealed[f[0] + 1 :]
    )
    cut = at.map(lambda n: sealed[:n])
    head, _, tail = sealed.partition(b'","sig":"')
    cert = st.binary(max_size=600).map(
        lambda der: SIGNED_PREFIX + b',"cert":"' + base64.b64encode(der) + b'","sig":"' + tail
    )
    sig = st.binary(max_size=90).map(
        lambda raw: head + b'","sig":"' + base64.b64encode(raw) + b'","payload":' + tail.partition(b'"payload":')[2]
    )
    return st.one_of(flip, cut, cert, sig, st.binary(max_size=300).map(lambda junk: SIGNED_PREFIX + junk))


@pytest.fixture(scope="module")
def genuine(network: Network) -> bytes:
    """One signed batch for every example (each signature is another: the examples must mutate one message)."""
    return network.signer(Identity.terminal(TERMINAL)).seal(_batch()).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_broken_signatures_and_certificates_never_raise_out_of_the_intake(
    network: Network, genuine: bytes, data: st.DataObject
) -> None:
    intake = Intake(CITY, HOST, identities=network.identities())
    payload = data.draw(_mutations(genuine))
    topic = Topic.parse(txn_topic(CITY, TERMINAL), CITY)
    assert topic is not None
    verdicts = intake.message(topic, payload, frozenset())
    assert verdicts and all(isinstance(v, Accepted | Refused) for v in verdicts)
    if any(isinstance(v, Accepted) for v in verdicts):  # only the signed bytes themselves, signed by the terminal
        assert unseal(payload).payload == unseal(genuine).payload
    for refused in (v for v in verdicts if isinstance(v, Refused)):
        assert refused.seq is None or not refused.reason.startswith("identity"), refused  # nothing acked for it
