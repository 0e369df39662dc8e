"""Broker addresses (``mqtt://[user[:password]@]host[:port][?mqtt=5|3.1.1]``, or ``mqtts://`` over TLS with a
client certificate), aiomqtt clients for them, and the embedded amqtt broker that lets everything run with pip
alone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
MQTT_VERSIONS = {"5": True, "3.1.1": False}  # ?mqtt=...: what the broker speaks (absent: try 5, fall back)
NEVER_EXPIRES = 0xFFFFFFFF  # MQTT 5 Session Expiry Interval: the session outlives any disconnect

_T = TypeVar("_T")

# "[SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] sslv3 alert certificate revoked (_ssl.c:2580)", as OpenSSL words an error
_SSL_ERROR = re.compile(r"\[SSL: (?P<code>[A-Z0-9_]+)\] (?P<text>[^()\[\]]*?)\s*(?:\(_ssl\.c:\d+\))?\s*$")
_TLS_ALERT = re.compile(r"(?:SSLV3|TLSV1|TLSV13)_ALERT_(?P<alert>[A-Z0-9_]+)")


def tls_refusal(text: str) -> str | None:
    """An OpenSSL error in a socket error's text, in words: "broker refused the TLS handshake: certificate
    revoked" for an alert the broker sent (revoked, expired, unknown ca, ...), "broker's certificate not trusted:
    ..." when this side refused the broker; None when ``text`` holds no OpenSSL error."""
    found = _SSL_ERROR.search(text)
    if found is None:
        return None
    code, words = found["code"], found["text"]
    alert = _TLS_ALERT.fullmatch(code)
    if alert is not None:
        return f"broker refused the TLS handshake: {alert['alert'].replace('_', ' ').lower()}"
    if code == "CERTIFICATE_VERIFY_FAILED":
        detail = words.removeprefix("certificate verify failed").lstrip(": ")
        return f"broker's certificate not trusted: {detail or 'verify failed'}"
    return f"TLS error: {words or code.replace('_', ' ').lower()}"


def connection_error(error: BaseException) -> str:
    """How a failed or lost connection is told in the log and ``terminal status``: a TLS refusal in words, else
    the client's own text."""
    return tls_refusal(str(error)) or str(error) or type(error).__name__


def stop_if_cancelled(lost: BaseExceptionGroup[aiomqtt.MqttError]) -> None:
    """Raise CancelledError when an MqttError caught by an ``except*`` that goes on to reconnect took the place of
    a cancel: aiomqtt's ``__aexit__``, cancelled while connected, waits for the disconnect and raises MqttError
    ("Operation timed out") in place of the CancelledError when the broker is slow, and so may a TaskGroup's child
    that is being cancelled. Taken for a lost connection, the cancel would be lost and whoever cancelled would
    wait for ever. (Not ``Task.cancelling()``: a TaskGroup of Python 3.11 leaves it raised after a child failed.)
    The CancelledError right under a TimeoutError is ``asyncio.timeout``'s own (a plain time-out), not a cancel."""
    for error in lost.exceptions:
        cause = error.__context__
        while cause is not None:
            if isinstance(cause, TimeoutError) and isinstance(cause.__context__, asyncio.CancelledError):
                cause = cause.__context__.__context__
                continue
            if isinstance(cause, asyncio.CancelledError):
                raise asyncio.CancelledError
            cause = cause.__context__


class ConnectRefused(aiomqtt.MqttError):
    """The connection ended before the broker's CONNACK (a TLS alert after the handshake, or the broker closed
    it, as a broker does with a protocol version it does not speak). The text says why."""


class ReasonedClient(aiomqtt.Client):
    """aiomqtt's client with what aiomqtt 2.x drops: the reason code of a QoS 1 publish's PUBACK
    (``publish_for_reason``; MQTT 5 brokers say 135 "not authorized" for a publish their ACL denies), and why a
    connection ended before its CONNACK, raised at once as ``ConnectRefused`` (aiomqtt waits out its timeout and
    says "Operation timed out"; the TLS alert reaches only paho's log)."""

    def __init__(self, *args: Any, connect_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connect_timeout = connect_timeout  # how long to wait for the CONNACK (None: aiomqtt's timeout)
        self._reasons: dict[int, asyncio.Future[ReasonCode]] = {}
        self._socket_error: str | None = None
        self._client.on_log = self._on_log

    async def __aenter__(self) -> ReasonedClient:
        """Connect, waiting ``connect_timeout`` for the CONNACK when it is set."""
        usual = self.timeout
        self.timeout = usual if self.connect_timeout is None else self.connect_timeout
        try:
            return await super().__aenter__()
        finally:
            self.timeout = usual

    async def _wait_for(self, fut: Awaitable[_T], timeout: float | None) -> _T:
        """aiomqtt's wait for the broker (CONNACK, SUBACK, PUBACK, the disconnect), with a cancellation that
        cannot be lost: asyncio.wait_for of Python 3.11 returns the result instead of raising CancelledError when
        the answer came in the same turn of the event loop as the cancel, and the task runs on as if never asked
        to stop. MqttError "Operation timed out" after ``timeout`` (None: the client's; math.inf: none)."""
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(None if limit == math.inf else limit):
                return await fut
        except TimeoutError:
            raise aiomqtt.MqttError("Operation timed out") from None

    async def publish_for_reason(self, topic: str, payload: bytes | str, qos: int = 1) -> ReasonCode:
        """Publish and wait for the broker's acknowledgement; its reason code (always success over MQTT 3.1.1,
        whose PUBACK has none, and at QoS 0). MqttError when the publish cannot go out or times out."""
        info = self._client.publish(topic, payload, qos)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        if info.is_published():  # QoS 0: nothing comes back
            return ReasonCode(PacketTypes.PUBACK)
        reason: asyncio.Future[ReasonCode] = self._loop.create_future()
        self._reasons[info.mid] = reason
        try:
            return await self._wait_for(reason, timeout=None)
        finally:
            self._reasons.pop(info.mid, None)

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Properties
    ) -> None:
        waiting = self._reasons.pop(mid, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(reason_code)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def _on_log(self, _client: paho.Client, _userdata: Any, level: int, text: str) -> None:
        # paho keeps the socket error of a failed read only for its log ("failed to receive on socket: [SSL: ...")
        if level == paho.MQTT_LOG_ERR:
            self._socket_error = text

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        connecting = self._connected
        if not connecting.done():  # closed before the CONNACK: say why now rather than after aiomqtt's timeout
            error = self._socket_error or "the broker closed the connection before its CONNACK"
            refused = ConnectRefused(tls_refusal(error) or error)
            self._loop.call_soon_threadsafe(_fail, connecting, refused)
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)


def _mqtt_version(text: str, query: str) -> bool | None:
    """``mqtt=5`` -> True, ``mqtt=3.1.1`` -> False, no query -> None; anything else is a ValueError."""
    if not query:
        return None
    pairs = parse_qsl(query, keep_blank_values=True)
    if len(pairs) != 1 or pairs[0][0] != "mqtt" or pairs[0][1] not in MQTT_VERSIONS:
        raise ValueError(f"broker {text!r}: the only setting is ?mqtt=5 or ?mqtt=3.1.1 (the protocol it speaks)")
    return MQTT_VERSIONS[pairs[0][1]]


def _fail(future: asyncio.Future[None], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class IncomingQueueFactory(Protocol):
    """Makes the queue a client keeps incoming messages in (a class such as ``asyncio.Queue``, or a method)."""

    def __call__(self, maxsize: int = 0) -> asyncio.Queue[aiomqtt.Message]: ...


@dataclass(frozen=True)
class TlsFiles:
    """A device's TLS files, as ``yikatong pki issue`` writes them: the CA that signed the broker, the device's
    certificate (with its CA after it) and its private key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def folder(cls, folder: Path) -> TlsFiles:
        """The files of a ``pki issue`` folder: ca.pem, cert.pem, key.pem."""
        return cls(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")

    def context(self) -> ssl.SSLContext:
        """A client context: TLS 1.2 or later, the broker's certificate checked against ``ca`` and its name, this
        device's certificate offered. OSError or ssl.SSLError when a file is missing or unusable."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


@dataclass(frozen=True)
class BrokerUrl:
    """Where the MQTT broker is, and how to log in: ``tls`` set for an ``mqtts://`` broker."""

    host: str
    port: int = DEFAULT_PORT
    username: str | None = None
    password: str | None = None
    secure: bool = False  # mqtts://: TLS, and ``tls`` must be given before a client is made
    tls: TlsFiles | None = None
    # False: the broker speaks MQTT 3.1.1 only (the embedded amqtt); None: unknown, a terminal tries MQTT 5 first
    speaks_mqtt5: bool | None = None

    @classmethod
    def parse(cls, text: str) -> BrokerUrl:
        """``mqtt://host[:port]`` or ``mqtts://host[:port]`` (TLS; port 8883 by default) with optional
        ``user:password@`` and ``?mqtt=5`` or ``?mqtt=3.1.1`` (the protocol the broker speaks; without it a
        terminal tries MQTT 5 and falls back); ValueError says what is wrong. An mqtts broker needs its TLS files
        (``with_tls``)."""
        try:
            parts = urlsplit(text)
        except ValueError as err:  # "Invalid IPv6 URL"
            raise ValueError(f"broker {text!r}: {err}") from None
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"broker {text!r}: use mqtt://host[:port] or mqtts://host[:port] (no websockets)")
        secure = parts.scheme == "mqtts"
        try:
            port = parts.port or (DEFAULT_TLS_PORT if secure else DEFAULT_PORT)
        except ValueError as err:
            raise ValueError(f"broker {text!r}: {err}") from None
        if not parts.hostname or parts.path not in ("", "/") or parts.fragment:
            raise ValueError(f"broker {text!r}: expected {parts.scheme}://host[:port]")
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        return cls(parts.hostname, port, user, password, secure, speaks_mqtt5=_mqtt_version(text, parts.query))

    def with_tls(self, tls: TlsFiles) -> BrokerUrl:
        """This ``mqtts://`` broker with the device's TLS files."""
        if not self.secure:
            raise ValueError(f"broker {self}: TLS files are for an mqtts:// broker")
        return replace(self, tls=tls)

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        version = "" if self.speaks_mqtt5 is None else f"?mqtt={'5' if self.speaks_mqtt5 else '3.1.1'}"
        return f"{'mqtts' if self.secure else 'mqtt'}://{user}{self.host}:{self.port}{version}"

    def client(
        self,
        identifier: str,
        *,
        clean_session: bool = False,
        mqtt5: bool = False,
        session_expiry: int = 3600,
        queue_type: IncomingQueueFactory | None = None,
        max_queued_incoming_messages: int | None = None,
        logger: logging.Logger | None = None,
        connect_timeout: float | None = None,
    ) -> ReasonedClient:
        """An aiomqtt client (one that also reads PUBACK reason codes) with a persistent session unless
        ``clean_session``: MQTT 3.1.1, or MQTT 5 (needed for shared subscriptions; the session then outlives a
        disconnect by ``session_expiry`` seconds, ``NEVER_EXPIRES`` for ever). ``queue_type``,
        ``max_queued_incoming_messages`` and ``logger`` go to aiomqtt as they are; ``connect_timeout`` bounds the
        wait for the CONNACK (default: aiomqtt's 10 s)."""
        if self.secure and self.tls is None:
            raise ValueError(f"broker {self}: mqtts:// needs the TLS files (CA, certificate, key)")
        expiry = None
        if mqtt5:
            expiry = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            expiry.SessionExpiryInterval = 0 if clean_session else session_expiry
        return ReasonedClient(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            tls_context=None if self.tls is None else self.tls.context(),
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5 if mqtt5 else None,
            # MQTT 5 says clean start; 3.1.1 clean session (aiomqtt's defaults leave the other one alone)
            clean_start=clean_session if mqtt5 else MQTT_CLEAN_START_FIRST_ONLY,
            clean_session=None if mqtt5 else clean_session,
            properties=expiry,
            # aiomqtt only calls it, as queue_type(maxsize=...): a factory does as well as a class
            queue_type=cast("type[asyncio.Queue[aiomqtt.Message]] | None", queue_type),
            max_queued_incoming_messages=max_queued_incoming_messages,
            logger=logger,
            # small QoS 1 packets both ways (record, PUBACK, ack): Nagle's algorithm would hold them for delayed ACKs
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            connect_timeout=connect_timeout,
        )


@dataclass
class LinkStats:
    """An MQTT client's link to its broker: up now or not, and how many connections it has made so far."""

    connected: bool = False
    connections: int = 0


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def embedded_broker(port: int | None = None) -> AsyncIterator[BrokerUrl]:
    """An amqtt broker in this process on a free loopback port (anonymous, no persistence)."""
    from amqtt.broker import Broker  # imported here: only the embedded default needs it

    port = port or free_port()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    broker = Broker(config)
    await broker.start()
    try:
        yield BrokerUrl("127.0.0.1", port, speaks_mqtt5=False)  # amqtt 0.12 hangs on an MQTT 5 CONNECT
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.shutdown(), 10)


@contextlib.asynccontextmanager
async def given_or_embedded(given: BrokerUrl | None) -> AsyncIterator[BrokerUrl]:
    """The broker the user gave, or an embedded one for as long as the context lasts."""
    if given is not None:
        yield given
        return
    async with embedded_broker() as url:
        yield url
