"""MQTT helpers for tests: the machine's Mosquitto, a private Mosquitto that can be stopped, and a stand-in
clearing that stores what it receives and acks it (the real clearing is its own service)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiomqtt

from clearing.pki import Pki
from terminals.messages import Ack, MessageError, parse_record, parse_uplink
from terminals.mqtt import BrokerUrl, free_port
from yikatong import load_mqtt as mqtt

MOSQUITTO = BrokerUrl("127.0.0.1", 1883)


def require_mosquitto() -> None:
    """Fail (not skip) when the machine's Mosquitto is not listening: scripts/services.sh starts it."""
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex(("127.0.0.1", 1883)) == 0, "Mosquitto not on 127.0.0.1:1883: run scripts/services.sh"


def unique_terminal(city: str = "4560") -> str:
    """A terminal number no other test (or earlier run) used, so topics on a shared broker do not mix."""
    return city + secrets.token_hex(4).upper()


class PrivateMosquitto:
    """A Mosquitto of our own on a free port (persistence on, in ``folder``), to stop and start at will.

    With ``password_file`` (made by ``mosquitto_passwd``) anonymous clients are refused; with ``acl_file`` each
    user may read and write only what the file allows. With ``tls`` (a PKI folder holding a server certificate for
    127.0.0.1) it listens with TLS only, as ``yikatong pki mosquitto-conf`` writes it: a client certificate of the
    PKI required, its CN the username, the PKI's CRL and ACL. Mosquitto reads these files after it has given up
    root for its ``mosquitto`` user, which cannot enter pytest's private tmp folders: with any of them it keeps
    its user."""

    def __init__(
        self,
        folder: Path,
        *,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        tls: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.conf = folder / "mosquitto.conf"
        if tls is not None:  # the listener 'yikatong pki mosquitto-conf' writes; the server certificate is 127.0.0.1's
            self.url = BrokerUrl("127.0.0.1", self.port, secure=True)
            conf = Pki(tls).mosquitto_listener(tls / "devices" / "server-127.0.0.1", self.port, "127.0.0.1")
        else:
            self.url = BrokerUrl("127.0.0.1", self.port)
            anonymous = "false" if password_file is not None else "true"
            conf = f"listener {self.port} 127.0.0.1\nallow_anonymous {anonymous}\n"
        conf += f"persistence true\npersistence_location {folder}/\n"
        if password_file is not None:
            conf += f"password_file {password_file}\n"
        if acl_file is not None:
            conf += f"acl_file {acl_file}\n"
        if password_file is not None or acl_file is not None or tls is not None:
            conf += "user root\n"  # "root": do not change user (only takes effect when started as root)
        self.conf.write_text(conf)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"private mosquitto exited with {self.proc.returncode}: see {self.conf}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError(f"private mosquitto did not start on port {self.port}")

    def reload(self) -> None:
        """SIGHUP: Mosquitto reads its configuration again, the ACL and the CRL with it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@contextlib.contextmanager
def private_mosquitto(
    folder: Path, *, password_file: Path | None = None, acl_file: Path | None = None, tls: Path | None = None
) -> Iterator[PrivateMosquitto]:
    broker = PrivateMosquitto(folder, password_file=password_file, acl_file=acl_file, tls=tls)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


class StubClearing:
    """Subscribes to every terminal topic, keeps every copy it receives, and acks each terminal through the
    highest seq it has seen without a gap."""

    def __init__(self, broker: BrokerUrl, reject: set[int] | None = None) -> None:
        self.broker = broker
        self.copies: list[tuple[int, str]] = []  # (seq, record JSON) for every copy delivered
        self.reject = reject or set()
        self.bad_payloads = 0
        self._seen: dict[str, set[int]] = {}

    def distinct(self) -> dict[int, str]:
        """Seq -> JSON; asserts that every copy of a seq is the same record."""
        out: dict[int, str] = {}
        for seq, doc in self.copies:
            assert out.setdefault(seq, doc) == doc, f"seq {seq} was sent with different content"
        return out

    async def run(self) -> None:
        while True:
            try:
                async with self.broker.client(f"stub-clearing-{secrets.token_hex(3)}", clean_session=True) as client:
                    await client.subscribe("yikatong/+/txn/+", qos=1)
                    async for message in client.messages:
                        await self._handle(client, message)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)

    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        city, _, terminal = message.topic.value.split("/")[1:4]
        assert isinstance(message.payload, bytes)
        try:
            docs = parse_uplink(message.payload)
        except MessageError:
            self.bad_payloads += 1
            return
        seen = self._seen.setdefault(terminal, set())
        for doc in docs:
            record = parse_record(doc)
            self.copies.append((record.seq, json.dumps(doc, separators=(",", ":"))))
            seen.add(record.seq)
        through = 0
        while through + 1 in seen:
            through += 1
        rejected = [{"seq": s, "reason": "test rejection"} for s in sorted(self.reject) if s <= through]
        ack = Ack.model_validate(
            {"schema": "yikatong.ack/1", "terminal": terminal, "acked_through": through, "rejected": rejected}
        )
        await client.publish(f"yikatong/{city}/ack/{terminal}", ack.to_json(), qos=1)


class ScriptedBroker:
    """A broker of a few lines for what a real one will not do on demand: answers CONNECT with ``connack``, the
    n-th SUBSCRIBE (from 0, over all connections) with ``suback(n, filter)`` for each filter, a QoS 1 PUBLISH with
    PUBACK, PINGREQ with PINGRESP; keeps the type of each packet a client sent and the filters of each SUBSCRIBE;
    ``send`` writes to the latest connection (an ack, as if from the clearing). Delivers nothing by itself."""

    def __init__(self, version: int, connack: bytes, suback: Callable[[int, str], int]) -> None:
        self.version, self.connack, self.suback = version, connack, suback
        self.kinds: list[int] = []
        self.subscriptions: list[list[str]] = []
        self.connections = 0
        self._writer: asyncio.StreamWriter | None = None

    def send(self, data: bytes) -> None:
        """Write ``data`` to the client connected last."""
        assert self._writer is not None, "no client connected"
        self._writer.write(data)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection (an ``asyncio.start_server`` callback)."""
        self.connections += 1
        self._writer = writer
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = (await reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    digit = (await reader.readexactly(1))[0]
                    length |= (digit & 0x7F) << shift
                    shift += 7
                    if not digit & 0x80:
                        break
                body = await reader.readexactly(length)
                kind = head >> 4
                self.kinds.append(kind)
                if kind == mqtt.CONNECT:
                    writer.write(self.connack)
                elif kind == mqtt.SUBSCRIBE:
                    writer.write(self._suback(body))
                elif kind == mqtt.PUBLISH and head & 0x06:
                    topic_length = struct.unpack("!H", body[:2])[0]
                    writer.write(mqtt.puback(struct.unpack("!H", body[2 + topic_length : 4 + topic_length])[0]))
                elif kind == mqtt.PINGREQ:
                    writer.write(b"\xd0\x00")

    def _suback(self, body: bytes) -> bytes:
        at = 2 + (1 + body[2] if self.version == mqtt.MQTT5 else 0)  # past the packet id (and short properties)
        filters = []
        while at < len(body):
            size = struct.unpack("!H", body[at : at + 2])[0]
            filters.append(body[at + 2 : at + 2 + size].decode())
            at += 3 + size  # the filter and its options byte
        number = len(self.subscriptions)
        self.subscriptions.append(filters)
        codes = bytes(self.suback(number, topic) for topic in filters)
        answer = body[:2] + (b"\x00" if self.version == mqtt.MQTT5 else b"") + codes
        return bytes([0x90, len(answer)]) + answer


@contextlib.asynccontextmanager
async def running(coro_factory: object) -> AsyncIterator[asyncio.Task[None]]:
    """Run a coroutine as a task for the duration of the block."""
    task: asyncio.Task[None] = asyncio.create_task(coro_factory)  # type: ignore[arg-type]
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def eventually(check: object, timeout: float = 20.0) -> None:
    """Wait until ``check()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def mosquitto_pub_lines(port: int, topic: str, lines: list[bytes], folder: Path) -> None:
    """An outside client: ``mosquitto_pub -l`` publishes each line of a file as one message (QoS 1)."""
    assert all(b"\n" not in line and b"\r" not in line and b"\x00" not in line for line in lines)
    path = folder / f"lines-{secrets.token_hex(4)}.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    binary = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
    command = [binary, "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic, "-l"]
    with path.open("rb") as stdin:
        done = subprocess.run(command, stdin=stdin, capture_output=True, timeout=120)
    assert done.returncode == 0, f"mosquitto_pub -l on {topic}: {done.stderr.decode(errors='replace')}"


def mosquitto_pub_file(port: int, topic: str, payload: bytes, folder: Path) -> None:
    """An outside client: ``mosquitto_pub -f`` publishes the whole file as one message (QoS 1)."""
    path = folder / f"payload-{secrets.token_hex(4)}.bin"
    path.write_bytes(payload)
    binary = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
    command = [binary, "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic, "-f", str(path)]
    done = subprocess.run(command, capture_output=True, timeout=60)
    assert done.returncode == 0, f"mosquitto_pub -f on {topic}: {done.stderr.decode(errors='replace')}"


class MosquittoSub:
    """An outside client: ``mosquitto_sub`` on one topic of a local broker, for one QoS 1 message."""

    def __init__(self, port: int, topic: str) -> None:
        listen = ["-d", "-p", str(port), "-q", "1", "-C", "1", "-W", "60", "-t", topic]
        # line-buffered, so that its SUBACK line shows before the caller goes on
        self.proc = subprocess.Popen(["stdbuf", "-oL", "mosquitto_sub", *listen], stdout=subprocess.PIPE, text=True)
        self.output = ""
        assert self.proc.stdout is not None
        seen = [self.proc.stdout.readline() for _ in range(4)]  # CONNECT, CONNACK, SUBSCRIBE, SUBACK
        assert "SUBACK" in seen[-1], seen

    def payloads(self) -> list[str]:
        """The payload lines it printed (its debug lines left out); waits until it exits on its one message
        (-C 1) or after 60 s (-W 60). Its whole output stays in ``output`` for failure messages."""
        assert self.proc.stdout is not None
        self.output = self.proc.stdout.read()
        return [line for line in self.output.splitlines() if line.startswith("{")]


@contextlib.contextmanager
def mosquitto_sub(port: int, topic: str) -> Iterator[MosquittoSub]:
    """A ``MosquittoSub`` subscribed (its SUBACK seen) for the block, killed after it."""
    sub = MosquittoSub(port, topic)
    try:
        yield sub
    finally:
        sub.proc.kill()
        sub.proc.wait(10)


def terminal_purchase(command: str, device: list[str], number: str, state: Path, port: int) -> None:
    """``yikatong terminal tap|run`` (``command``) on ``device`` (``--reader NAME`` or ``--pn532 PTY``): one
    2.00 yuan bus fare in city 4560 as terminal ``number``, publishing to the broker on ``port``; asserts that it
    charged a 30.00 yuan card."""
    tap = ["terminal", command, *device, "--city", "4560", "--kind", "bus", "--fare", "200"]
    options = ["--terminal", number, "--state", str(state), "--broker", f"mqtt://127.0.0.1:{port}"]
    options += ["--count", "1"] if command == "run" else []
    done = subprocess.run(
        [sys.executable, "-m", "yikatong.cli", *tap, *options], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK       purchase card" in done.stdout and "-2.00 -> 28.00 yuan" in done.stdout, done.stdout
