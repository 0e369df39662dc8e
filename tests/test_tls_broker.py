"""Terminal identity over TLS on a real Mosquitto (issue 18): a private broker started with the listener
``yikatong pki mosquitto-conf`` writes (client certificate required, CN as username, the PKI's CRL and ACL).
A terminal with its own certificate taps a card and its record is stored and acked by a real ``clearing serve``;
a terminal cannot publish on another terminal's topic; revoked (after SIGHUP), expired, foreign and missing
certificates do not get in; ``mosquitto_pub`` and ``openssl s_client``, clients nobody here wrote, agree."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
from clearing_support import serve_process, signed_records, table_counts
from hypothesis import given
from hypothesis import strategies as st
from mqtt_support import PrivateMosquitto, private_mosquitto
from reliability_support import cpu_card
from support import yikatong
from terminal_support import make_terminal

from clearing.db import open_engine
from clearing.ledger import Ledger
from clearing.pki import Identity, Pki
from terminals.messages import TxnRecord, ack_topic, hotlist_delta_topic, parse_ack, txn_topic
from terminals.mqtt import BrokerUrl, ConnectRefused, TlsFiles, tls_refusal
from terminals.reader import InProcessReader
from terminals.signing import Signer

CITY = "4560"
REFUSED_WITHIN = 3.0  # seconds to wait for a connection expected to be refused (a good one takes milliseconds)
HONEST, OTHER, STOLEN, EXPIRED, LOST = (f"{CITY}0000{n:04X}" for n in (0xA1, 0xA2, 0xA3, 0xA4, 0xA5))


@dataclass
class TlsNetwork:
    pki: Pki
    broker: PrivateMosquitto
    foreign: Path  # a device folder from another PKI with the HONEST terminal's name

    def device(self, identity: Identity) -> Path:
        return self.pki.folder / "devices" / identity.folder

    def url(self, identity: Identity | Path) -> BrokerUrl:
        folder = identity if isinstance(identity, Path) else self.device(identity)
        return self.broker.url.with_tls(TlsFiles.folder(folder))


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNetwork]:
    top = tmp_path_factory.mktemp("tls")
    pki = Pki.create(top / "pki", [CITY, "4510"])
    for identity in [Identity.terminal(HONEST), Identity.terminal(OTHER), Identity.terminal(STOLEN)]:
        pki.issue(identity)
    pki.issue(Identity.clearing(CITY))
    pki.issue(Identity.server("127.0.0.1"))
    past = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    pki.issue(Identity.terminal(EXPIRED), not_before=past, not_after=past + dt.timedelta(days=30))
    _, foreign = Pki.create(top / "foreign", [CITY]).issue(Identity.terminal(HONEST))
    shutil.copy(pki.folder / "ca/root/cert.pem", foreign / "ca.pem")  # it trusts our broker; we do not trust it
    (top / "broker").mkdir()
    with private_mosquitto(top / "broker", tls=pki.folder) as broker:
        yield TlsNetwork(pki, broker, foreign)


async def _connects(url: BrokerUrl, timeout: float = 10) -> bool:
    """Whether a client with ``url``'s certificate gets in. A refused handshake shows in aiomqtt only as its
    connect timing out (paho logs the TLS alert): ``timeout`` shortens the wait where a refusal is expected."""
    try:
        async with aiomqtt.Client(
            url.host, url.port, identifier="probe", tls_context=url.tls.context() if url.tls else None, timeout=timeout
        ):
            return True
    except aiomqtt.MqttError:
        return False


@pytest.mark.parametrize("shared", [False, True], ids=["worker", "shared-worker"])
async def test_terminal_taps_and_the_clearing_stores_and_acks_over_tls(
    network: TlsNetwork, tmp_path: Path, shared: bool
) -> None:
    """(``--shared``: an MQTT 5 shared subscription, $share/clearing-CITY/..., which the ACL allows as the topic.)"""
    card, state = tmp_path / "card.json", tmp_path / "terminal.sqlite"
    issued = yikatong("card", "issue", "--city", CITY, "--alg", "sm4", "--balance", "3000", "--out", str(card))
    assert issued.returncode == 0, issued.stderr
    db = f"sqlite:///{tmp_path / 'clearing.sqlite'}"
    clearing_dir = str(network.device(Identity.clearing(CITY)))
    extra = ["--shared"] if shared else []
    with serve_process(network.broker.url, db, CITY, "tls", "--tls-dir", clearing_dir, *extra) as serve:
        tap = ["terminal", "tap", "--card", str(card), "--city", CITY, "--kind", "bus", "--fare", "200"]
        tap += ["--terminal", HONEST, "--state", str(state), "--broker", str(network.broker.url)]
        tap += ["--tls-dir", str(network.device(Identity.terminal(HONEST))), "--ack-wait", "60"]
        done = yikatong(*tap)
        assert done.returncode == 0 and "OK       purchase" in done.stdout, done.stdout + done.stderr
        assert "stay in the outbox" not in done.stderr and "unreachable" not in done.stderr, done.stderr
        status = yikatong("terminal", "status", "--state", str(state))
        assert "outbox     0 record(s) not yet acked" in status.stdout, status.stdout
        assert serve.stop() == 1
    counts = await table_counts(db, CITY)
    assert counts["ledger"] == 1 and counts["quarantine"] == 0


async def test_a_terminal_cannot_publish_on_another_terminals_topic(network: TlsNetwork) -> None:
    """MQTT 3.1.1: Mosquitto acks the forbidden publish and drops it. The clearing-side subscriber gets the
    terminal's next (allowed) message and nothing before it: the same client's messages keep their order."""
    clearing = network.url(Identity.clearing(CITY))
    async with clearing.client("tls-clearing-side", clean_session=True) as sub:
        await sub.subscribe(txn_topic(CITY, "+"), qos=1)
        async with network.url(Identity.terminal(HONEST)).client("tls-honest", clean_session=True) as honest:
            await honest.publish(txn_topic(CITY, OTHER), b"forged", qos=1)
            await honest.publish(txn_topic("4510", HONEST), b"wrong city", qos=1)
            await honest.publish(txn_topic(CITY, HONEST), b"marker", qos=1)
        seen = []
        async for message in sub.messages:
            seen.append((message.topic.value, message.payload))
            if message.payload == b"marker":
                break
    assert seen == [(txn_topic(CITY, HONEST), b"marker")]


async def test_behind_a_wrong_acl_the_clearing_quarantines_what_the_topics_terminal_did_not_sign(
    network: TlsNetwork, tmp_path: Path
) -> None:
    """Issue 18 item 3, defence in depth: an ACL that wrongly lets HONEST write on every terminal topic of the
    city. HONEST's signed and unsigned copies of a record on OTHER's topic are quarantined (identity reasons) and
    ack nothing; OTHER's own signed record of the same seq is then stored once and acked."""
    acl = network.pki.folder / "acl"
    kept = acl.read_text()
    (record,) = signed_records(1, CITY, OTHER, issuers=(CITY,), cards=1, seed=77)
    forged = Signer.of(TlsFiles.folder(network.device(Identity.terminal(HONEST)))).seal(record.to_json())
    genuine = Signer.of(TlsFiles.folder(network.device(Identity.terminal(OTHER)))).seal(record.to_json())
    db = f"sqlite:///{tmp_path / 'clearing.sqlite'}"
    clearing_dir = str(network.device(Identity.clearing(CITY)))
    wrong = kept.replace(f"user terminal:{HONEST}\n", f"user terminal:{HONEST}\ntopic write {txn_topic(CITY, '+')}\n")
    assert wrong != kept
    try:
        acl.write_text(wrong)
        network.broker.reload()
        with serve_process(network.broker.url, db, CITY, "wrong-acl", "--tls-dir", clearing_dir) as serve:
            async with network.url(Identity.terminal(OTHER)).client("tls-other", clean_session=True) as other:
                await other.subscribe(ack_topic(CITY, OTHER), qos=1)
                reasons = await _quarantined_while(network.url(Identity.terminal(HONEST)), OTHER, forged, record, db)
                await other.publish(txn_topic(CITY, OTHER), genuine, qos=1)
                message = await asyncio.wait_for(anext(aiter(other.messages)), 20)
            assert serve.stop() == 1
    finally:
        acl.write_text(kept)
        network.broker.reload()
    assert set(reasons) == {
        f"identity: certificate of terminal {HONEST} on the topic of terminal {OTHER}",
        "identity: unsigned (this clearing requires terminals to sign with their certificate)",
    }, reasons
    ack = parse_ack(message.payload)  # type: ignore[arg-type]
    assert (ack.terminal, ack.acked_through, ack.rejected) == (OTHER, 1, [])
    counts = await table_counts(db, CITY)
    assert counts["ledger"] == 1 and counts["quarantine"] == sum(reasons.values())


async def _quarantined_while(
    intruder: BrokerUrl, victim: str, forged: str, record: TxnRecord, db: str
) -> dict[str, int]:
    """Publish the forged copy (signed by the intruder) and the unsigned copy of ``record`` on the victim's topic
    until the clearing has quarantined both (the broker takes the wrong ACL at its reload, a moment after the
    signal); the quarantine's reasons with their counts."""
    engine = open_engine(db)
    try:
        ledger = Ledger(engine, CITY)
        async with intruder.client("tls-wrong-acl", clean_session=True) as client:
            for _ in range(100):
                for payload in (forged, record.to_json()):
                    await client.publish(txn_topic(CITY, victim), payload, qos=1)
                await asyncio.sleep(0.2)
                reasons = dict(await ledger.quarantine_reasons())
                if len(reasons) >= 2:
                    return reasons
        raise AssertionError(f"the clearing did not quarantine both copies: {reasons}")
    finally:
        await engine.dispose()


async def test_a_revoked_certificate_cannot_connect_after_sighup(network: TlsNetwork) -> None:
    """Revoked and SIGHUP: new connections are refused; one already open stays open (Mosquitto does not recheck
    it) but its publishes are dropped, as the ACL lost its user block (docs/terminal-identity.md says so)."""
    stolen = network.url(Identity.terminal(STOLEN))
    assert await _connects(stolen)
    clearing = network.url(Identity.clearing(CITY))
    async with clearing.client("tls-revoke-watch", clean_session=True) as sub:
        await sub.subscribe(txn_topic(CITY, "+"), qos=1)
        async with stolen.client("tls-stolen", clean_session=True) as thief:
            await thief.publish(txn_topic(CITY, STOLEN), b"before", qos=1)
            serial = next(e.serial for e in network.pki.index() if e.subject == f"terminal:{STOLEN}")
            done = yikatong("pki", "revoke", serial, "--pki", str(network.pki.folder))
            assert done.returncode == 0, done.stderr
            network.broker.reload()
            await asyncio.wait_for(_until(stolen, connects=False), 20)
            await thief.publish(txn_topic(CITY, STOLEN), b"after", qos=1)  # acked (3.1.1) and dropped
        # the broker handled "after" before it acked it: a later message from anyone comes after it
        async with network.url(Identity.terminal(HONEST)).client("tls-honest-2", clean_session=True) as honest:
            await honest.publish(txn_topic(CITY, HONEST), b"marker", qos=1)
        seen = []
        async for message in sub.messages:
            seen.append(message.payload)
            if message.payload == b"marker":
                break
    assert seen == [b"before", b"marker"]
    assert await _connects(network.url(Identity.terminal(HONEST)))  # the others of its city are still in


async def test_a_terminal_on_another_terminals_certificate_is_refused_and_says_so(
    network: TlsNetwork, tmp_path: Path
) -> None:
    """Over TLS the broker knows a publisher by its certificate: a terminal set up with another terminal's
    certificate publishes on its own topic, which the ACL gives only to its own certificate. MQTT 5 PUBACK 135:
    the record is kept in the outbox marked refused, ``terminal sync`` says so and fails, ``terminal status``
    shows it; the clearing never gets it."""
    misplaced = f"{CITY}0000{0xA6:04X}"
    state = tmp_path / "misplaced.sqlite"
    terminal = make_terminal(state, city=CITY, terminal=misplaced)
    assert terminal.tap(InProcessReader(cpu_card(1, city=CITY))).ok
    terminal.outbox.close()
    other = network.device(Identity.terminal(OTHER))
    sync = ["terminal", "sync", "--state", str(state), "--broker", str(network.broker.url), "--tls-dir", str(other)]
    done = yikatong(*sync, "--timeout", "10")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "refused by the broker (PUBACK 135 not authorized)" in done.stderr, done.stderr
    status = yikatong("terminal", "status", "--state", str(state))
    assert "refused    1 record(s) the broker refused, kept unsent" in status.stdout, status.stdout
    assert "PUBACK 135 not authorized" in status.stdout, status.stdout


@pytest.mark.parametrize("who", ["expired", "foreign"])
async def test_expired_and_foreign_certificates_cannot_connect(network: TlsNetwork, who: str) -> None:
    folder = network.device(Identity.terminal(EXPIRED)) if who == "expired" else network.foreign
    assert not await _connects(network.url(folder), REFUSED_WITHIN)
    assert await _connects(network.url(Identity.terminal(HONEST)))


def _mosquitto_pub(network: TlsNetwork, topic: str, *tls: str) -> subprocess.CompletedProcess[str]:
    ca = str(network.pki.folder / "ca/root/cert.pem")
    command = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(network.broker.port), "--cafile", ca, *tls]
    return subprocess.run(
        [*command, "-q", "1", "-t", topic, "-m", "outside"], capture_output=True, text=True, timeout=30
    )


async def test_mosquitto_pub_needs_a_certificate(network: TlsNetwork) -> None:
    topic = txn_topic(CITY, HONEST)
    assert _mosquitto_pub(network, topic).returncode != 0
    device = network.device(Identity.terminal(HONEST))
    clearing = network.url(Identity.clearing(CITY))
    async with clearing.client("tls-outside-check", clean_session=True) as sub:
        await sub.subscribe(txn_topic(CITY, "+"), qos=1)
        done = _mosquitto_pub(network, topic, "--cert", str(device / "cert.pem"), "--key", str(device / "key.pem"))
        assert done.returncode == 0, done.stderr
        message = await anext(aiter(sub.messages))
        assert (message.topic.value, message.payload) == (topic, b"outside")


def test_openssl_s_client_sees_the_brokers_certificate(network: TlsNetwork) -> None:
    device = network.device(Identity.terminal(HONEST))
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{network.broker.port}", "-verify_return_error"]
    command += ["-CAfile", str(device / "ca.pem"), "-cert", str(device / "cert.pem"), "-key", str(device / "key.pem")]
    command += ["-verify_ip", "127.0.0.1", "-showcerts"]
    done = subprocess.run(command, input="", capture_output=True, text=True, timeout=30)
    assert "Verify return code: 0 (ok)" in done.stdout, done.stdout + done.stderr
    assert "CN = 127.0.0.1" in done.stdout and "yikatong network root CA" in done.stdout


async def test_crl_file_without_the_citys_crl_locks_the_city_out(network: TlsNetwork) -> None:
    """Mosquitto checks the CRL of the client's own CA only (OpenSSL's CRL_CHECK, not CRL_CHECK_ALL): a city whose
    CA has no CRL in crlfile cannot connect at all; the root's CRL is not needed."""
    crl = network.pki.folder / "crl.pem"
    whole = crl.read_bytes()
    honest = network.url(Identity.terminal(HONEST))
    try:
        crl.write_bytes((network.pki.folder / "ca/4510/crl.pem").read_bytes())
        network.broker.reload()
        await asyncio.wait_for(_until(honest, connects=False), 20)
        crl.write_bytes((network.pki.folder / f"ca/{CITY}/crl.pem").read_bytes())  # its own city's only
        network.broker.reload()
        await asyncio.wait_for(_until(honest, connects=True), 20)
    finally:
        crl.write_bytes(whole)
        network.broker.reload()


async def _until(url: BrokerUrl, *, connects: bool) -> None:
    """Until a connection with ``url``'s certificate succeeds (or fails): a SIGHUP takes effect a moment later."""
    while await _connects(url, REFUSED_WITHIN if not connects else 10) != connects:
        await asyncio.sleep(0.05)


async def test_the_clearing_publishes_the_hotlist_and_only_it(network: TlsNetwork, tmp_path: Path) -> None:
    """``clearing hotlist add`` over TLS with the clearing's certificate: every terminal reads the retained list;
    a terminal's certificate cannot overwrite it."""
    serial = "45600000000000000042"  # (the first version goes out as a snapshot, with an empty retained delta)
    db = f"sqlite:///{tmp_path / 'hotlist.sqlite'}"
    clearing_dir = str(network.device(Identity.clearing(CITY)))
    add = ["clearing", "hotlist", "add", serial, "--city", CITY, "--db", db, "--broker", str(network.broker.url)]
    done = yikatong(*add, "--tls-dir", clearing_dir)
    assert done.returncode == 0 and "published retained" in done.stdout, done.stdout + done.stderr
    delta = hotlist_delta_topic(CITY)
    async with network.url(Identity.terminal(OTHER)).client("tls-forger", clean_session=True) as forger:
        await forger.publish(delta, b"forged", qos=1, retain=True)  # acked, dropped: a terminal only reads it
    async with network.url(Identity.terminal(HONEST)).client("tls-hotlist-reader", clean_session=True) as reader:
        await reader.subscribe(delta, qos=1)
        message = await anext(aiter(reader.messages))
    assert message.payload == b'{"schema":"yikatong.hotlist-delta/1","issuer":"4560","base":1,"version":1,"changes":[]}'


async def test_a_revoked_terminal_says_why_in_its_log_and_status_at_the_first_attempt(
    network: TlsNetwork, tmp_path: Path
) -> None:
    """The broker's TLS alert in words, at once: the client fails with it (aiomqtt alone times out after 10 s
    saying "Operation timed out"), ``terminal sync`` logs it once, ``terminal tap`` says it, ``terminal status``
    shows it, the records stay."""
    _, folder = network.pki.issue(Identity.terminal(LOST))
    url = network.url(folder)
    assert await _connects(url)
    serial = next(e.serial for e in network.pki.index() if e.subject == f"terminal:{LOST}")
    assert yikatong("pki", "revoke", serial, "--pki", str(network.pki.folder)).returncode == 0
    network.broker.reload()
    await asyncio.wait_for(_until(url, connects=False), 20)
    with pytest.raises(ConnectRefused, match=r"^broker refused the TLS handshake: certificate revoked$"):
        async with url.client("tls-lost", clean_session=True, connect_timeout=60):  # refused long before 60 s
            pass

    state = tmp_path / "lost.sqlite"
    terminal = make_terminal(state, city=CITY, terminal=LOST)
    assert terminal.tap(InProcessReader(cpu_card(1, city=CITY))).ok
    terminal.outbox.close()
    sync = ["terminal", "sync", "--state", str(state), "--broker", str(network.broker.url), "--tls-dir", str(folder)]
    done = yikatong(*sync, "--timeout", "2")
    assert done.returncode == 1, done.stdout + done.stderr
    said = f"uplink to {network.broker.url}: broker refused the TLS handshake: certificate revoked; retrying"
    assert done.stderr.count(said) == 1 and "timed out" not in done.stderr, done.stderr  # once, not every retry
    card = tmp_path / "card.json"
    assert (
        yikatong("card", "issue", "--city", CITY, "--alg", "sm4", "--balance", "3000", "--out", str(card)).returncode
        == 0
    )
    tap = ["terminal", "tap", "--card", str(card), "--city", CITY, "--kind", "bus", "--fare", "200"]
    tap += ["--state", str(state), "--broker", str(network.broker.url), "--tls-dir", str(folder)]
    done = yikatong(*tap, "--hotlist-wait", "0")
    assert done.returncode == 0 and done.stdout.startswith("OK"), done.stdout + done.stderr
    kept = f"broker {network.broker.url} unreachable (broker refused the TLS handshake: certificate revoked): 2 record"
    assert kept in done.stderr, done.stderr
    status = yikatong("terminal", "status", "--state", str(state))
    assert "outbox     2 record(s) not yet acked" in status.stdout, status.stdout
    assert re.search(
        r"^broker     last connection failed at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ: "
        r"broker refused the TLS handshake: certificate revoked$",
        status.stdout,
        re.MULTILINE,
    ), status.stdout


@pytest.mark.parametrize("who", ["expired", "foreign"])
async def test_expired_and_foreign_certificates_are_told_in_words(network: TlsNetwork, who: str) -> None:
    folder = network.device(Identity.terminal(EXPIRED)) if who == "expired" else network.foreign
    alert = "certificate expired" if who == "expired" else "unknown ca"
    with pytest.raises(ConnectRefused, match=f"^broker refused the TLS handshake: {alert}$"):
        async with network.url(folder).client(f"tls-{who}", clean_session=True, connect_timeout=60):
            pass


# --- mqtts:// URLs and the TLS options, without a broker ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "failed to receive on socket: [SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] sslv3 alert certificate revoked "
            "(_ssl.c:2580)",
            "broker refused the TLS handshake: certificate revoked",
        ),
        (
            "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)",
            "broker refused the TLS handshake: unknown ca",
        ),
        (
            "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required (_ssl.c:2580)",
            "broker refused the TLS handshake: certificate required",
        ),
        (
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate "
            "(_ssl.c:1006)",
            "broker's certificate not trusted: unable to get local issuer certificate",
        ),
        ("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)", "TLS error: wrong version number"),
        ("[Errno 111] Connection refused", None),
        ("Operation timed out", None),
    ],
)
def test_tls_errors_are_told_in_words(text: str, words: str | None) -> None:
    assert tls_refusal(text) == words


_CODES = st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"), min_size=1, max_size=40)


@given(st.text(max_size=300))
def test_tls_refusal_takes_any_text(text: str) -> None:
    words = tls_refusal(text)
    assert words is None or words.startswith(("broker refused", "broker's certificate", "TLS error"))
    if "[SSL: " not in text:
        assert words is None


@given(st.text(max_size=60), st.sampled_from(["SSLV3", "TLSV1", "TLSV13"]), _CODES, st.integers(0, 99999))
def test_every_tls_alert_is_told_as_the_broker_refusing(prefix: str, kind: str, alert: str, line: int) -> None:
    text = f"{prefix}[SSL: {kind}_ALERT_{alert}] {kind.lower()} alert whatever (_ssl.c:{line})"
    assert tls_refusal(text) == f"broker refused the TLS handshake: {alert.replace('_', ' ').lower()}"


@pytest.mark.parametrize(("query", "speaks"), [("", None), ("?mqtt=5", True), ("?mqtt=3.1.1", False)])
def test_a_broker_url_may_say_which_mqtt_it_speaks(query: str, speaks: bool | None) -> None:
    url = BrokerUrl.parse(f"mqtts://broker.example{query}")
    assert url.speaks_mqtt5 is speaks and str(url) == f"mqtts://broker.example:8883{query}"
    for bad in ("?mqtt=4", "?mqtt=5&mqtt=5", "?protocol=5", "?mqtt", "#frag"):
        with pytest.raises(ValueError, match="broker"):
            BrokerUrl.parse(f"mqtt://h{bad}")


@given(
    st.sampled_from(["mqtt", "mqtts"]),
    st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True),
    st.integers(1, 65535),
    st.sampled_from([None, True, False]),
)
def test_broker_urls_read_back_as_written(scheme: str, host: str, port: int, speaks: bool | None) -> None:
    url = BrokerUrl(host, port, secure=scheme == "mqtts", speaks_mqtt5=speaks)
    assert BrokerUrl.parse(str(url)) == url


@given(st.sampled_from(["", "mqtt://", "mqtts://", "mqtt://h", "mqtt://h:1?"]), st.text(max_size=80))
def test_any_broker_text_parses_or_says_why(start: str, rest: str) -> None:
    text = start + rest
    try:
        url = BrokerUrl.parse(text)
    except ValueError as err:
        assert str(err).startswith("broker ")
    else:
        assert BrokerUrl.parse(str(url)).speaks_mqtt5 is url.speaks_mqtt5


def test_mqtts_url_parses_with_its_default_port() -> None:
    url = BrokerUrl.parse("mqtts://broker.example")
    assert (url.host, url.port, url.secure, url.tls) == ("broker.example", 8883, True, None)
    assert str(url) == "mqtts://broker.example:8883" and BrokerUrl.parse("mqtt://h").port == 1883
    with pytest.raises(ValueError, match="needs the TLS files"):
        url.client("x")
    with pytest.raises(ValueError, match="mqtts://"):
        BrokerUrl.parse("mqtt://h").with_tls(TlsFiles.folder(Path("x")))


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--broker", "mqtts://127.0.0.1"], "mqtts:// needs --tls-dir DIR"),
        (["--broker", "mqtts://127.0.0.1", "--ca", "x.pem"], "mqtts:// needs --tls-dir DIR"),
        (["--broker", "mqtt://127.0.0.1", "--tls-dir", "{honest}"], "are for an mqtts:// --broker"),
        (["--tls-dir", "{honest}"], "are for an mqtts:// --broker"),
        (["--broker", "mqtts://127.0.0.1", "--tls-dir", "/no/such"], "--tls-dir /no/such: no such folder"),
        (
            ["--broker", "mqtts://127.0.0.1", "--tls-dir", "{honest}", "--cert", "/no/cert.pem"],
            "--cert /no/cert.pem: no such",
        ),
        (["--broker", "mqtts://127.0.0.1", "--tls-dir", "{honest}", "--key", "{other}/key.pem"], "TLS files"),
        (["--broker", "mqtts://127.0.0.1", "--tls-dir", "{honest}", "--ca", "{honest}/key.pem"], "TLS files"),
    ],
)
def test_tls_options_refused_with_one_clear_line(
    network: TlsNetwork, tmp_path: Path, args: list[str], said: str
) -> None:
    honest, other = network.device(Identity.terminal(HONEST)), network.device(Identity.terminal(OTHER))
    filled = [a.format(honest=honest, other=other) for a in args]
    tap = ["terminal", "tap", "--card", "no-card.json", "--city", CITY, "--kind", "bus", "--fare", "200"]
    done = yikatong(*tap, "--state", str(tmp_path / "t.sqlite"), *filled)
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert "PRIVATE KEY" not in done.stderr


def test_load_runs_over_tls_with_a_certificate_per_terminal(network: TlsNetwork, tmp_path: Path) -> None:
    """20 simulated terminals, each with its own certificate (issued by --issue-certificates-only, then the
    broker reloads the ACL), signing what they publish to the load's own clearings, which require signatures."""
    run = ["load", "--broker", str(network.broker.url), "--pki", str(network.pki.folder), "--seed", "18"]
    run += ["--terminals", "20", "--cities", f"{CITY},4510"]
    issued = yikatong(*run, "--issue-certificates-only")
    assert issued.returncode == 0 and "issued 21 certificates" in issued.stdout, issued.stdout + issued.stderr
    again = yikatong(*run, "--issue-certificates-only")  # the clearing of CITY was issued by the fixture
    assert "issued 0 certificates" in again.stdout and "kept 22" in again.stdout, again.stdout
    network.broker.reload()
    out = tmp_path / "run"
    done = yikatong(*run, "--cards", "40", "--rate", "20", "--duration", "3", "--workers", "2", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads((out / "load-summary.json").read_text())
    assert doc["generated"] > 0 and doc["acked"] == doc["generated"], doc
    assert doc["unacked"] == 0 and doc["rejected"] == 0 and doc["settings"]["broker"].startswith("mqtts://")
    stored: list[tuple[str, int]] = []  # (terminal, seq) of what the acquirers stored from their terminals
    for city in (CITY, "4510"):
        with contextlib.closing(sqlite3.connect(out / f"clearing-{city}.sqlite")) as db:
            stored += db.execute("SELECT terminal, seq FROM ledger WHERE source = 'terminal'").fetchall()
            assert db.execute("SELECT count(*) FROM quarantine").fetchone() == (0,)  # no identity refused
    assert len(stored) == len(set(stored)) == doc["generated"]  # each record once, none lost


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--broker", "mqtts://127.0.0.1"], "an mqtts:// --broker and --issue-certificates-only need --pki DIR"),
        (["--pki", "{pki}", "--seed", "1"], "--pki is for an mqtts:// --broker"),
        (["--broker", "mqtts://127.0.0.1", "--pki", "{pki}"], "--pki needs --seed N (or --state-dir DIR)"),
        (["--broker", "mqtts://127.0.0.1", "--pki", "/no/such", "--seed", "1"], "not a PKI folder"),
        (
            ["--broker", "mqtts://127.0.0.1", "--pki", "{pki}", "--seed", "1", "--terminals", "3"],
            "holds no valid certificate for 3 of the load's 4 terminals and clearings",
        ),
    ],
)
def test_load_refuses_tls_options_with_one_clear_line(network: TlsNetwork, args: list[str], said: str) -> None:
    filled = [a.format(pki=network.pki.folder) for a in args]
    done = yikatong("load", "--cities", CITY, *filled)
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    if "holds no valid" in said:
        assert "--issue-certificates-only" in done.stderr


@pytest.mark.parametrize(
    ("crl", "said"),
    [("/no/such.pem", "--crl /no/such.pem: no such file"), ("ca/4510/crl.pem", "no CRL of the city 4560 CA in it")],
)
def test_serve_refuses_a_crl_file_it_cannot_use(network: TlsNetwork, tmp_path: Path, crl: str, said: str) -> None:
    clearing_dir = str(network.device(Identity.clearing(CITY)))
    serve = ["clearing", "serve", "--city", CITY, "--broker", str(network.broker.url), "--tls-dir", clearing_dir]
    done = yikatong(*serve, "--db", f"sqlite:///{tmp_path / 'c.sqlite'}", "--crl", str(network.pki.folder / crl))
    assert done.returncode == 2 and said in done.stderr, done.stderr
