"""Broker addresses (``mqtt://[user[:password]@]host[:port]``, or ``mqtts://`` over TLS with a client
certificate), aiomqtt clients for them, and the embedded amqtt broker that lets everything run with pip alone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, cast
from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883


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

    @classmethod
    def parse(cls, text: str) -> BrokerUrl:
        """``mqtt://host[:port]`` or ``mqtts://host[:port]`` (TLS; port 8883 by default) with optional
        ``user:password@``; ValueError says what is wrong. An mqtts broker needs its TLS files (``with_tls``)."""
        parts = urlsplit(text)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"broker {text!r}: use mqtt://host[:port] or mqtts://host[:port] (no websockets)")
        secure = parts.scheme == "mqtts"
        try:
            port = parts.port or (DEFAULT_TLS_PORT if secure else DEFAULT_PORT)
        except ValueError as err:
            raise ValueError(f"broker {text!r}: {err}") from None
        if not parts.hostname or parts.path not in ("", "/") or parts.query:
            raise ValueError(f"broker {text!r}: expected {parts.scheme}://host[:port]")
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        return cls(parts.hostname, port, user, password, secure)

    def with_tls(self, tls: TlsFiles) -> BrokerUrl:
        """This ``mqtts://`` broker with the device's TLS files."""
        if not self.secure:
            raise ValueError(f"broker {self}: TLS files are for an mqtts:// broker")
        return replace(self, tls=tls)

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.secure else 'mqtt'}://{user}{self.host}:{self.port}"

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
    ) -> aiomqtt.Client:
        """An aiomqtt client with a persistent session unless ``clean_session``: MQTT 3.1.1, or MQTT 5 (needed
        for shared subscriptions; the session then outlives a disconnect by ``session_expiry`` seconds).
        ``queue_type``, ``max_queued_incoming_messages`` and ``logger`` go to aiomqtt as they are."""
        if self.secure and self.tls is None:
            raise ValueError(f"broker {self}: mqtts:// needs the TLS files (CA, certificate, key)")
        expiry = None
        if mqtt5:
            expiry = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            expiry.SessionExpiryInterval = 0 if clean_session else session_expiry
        return aiomqtt.Client(
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
        yield BrokerUrl("127.0.0.1", port)
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
