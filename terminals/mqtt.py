"""Broker addresses (``mqtt://[user[:password]@]host[:port]``), aiomqtt clients for them, and the embedded
amqtt broker that lets everything run with pip alone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

DEFAULT_PORT = 1883


@dataclass(frozen=True)
class BrokerUrl:
    """Where the MQTT broker is, and how to log in."""

    host: str
    port: int = DEFAULT_PORT
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, text: str) -> BrokerUrl:
        """``mqtt://host[:port]`` with optional ``user:password@``; ValueError says what is wrong."""
        parts = urlsplit(text)
        if parts.scheme != "mqtt":
            raise ValueError(f"broker {text!r}: use mqtt://host[:port] (TLS and websockets are not supported)")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError as err:
            raise ValueError(f"broker {text!r}: {err}") from None
        if not parts.hostname or parts.path not in ("", "/") or parts.query:
            raise ValueError(f"broker {text!r}: expected mqtt://host[:port]")
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        return cls(parts.hostname, port, user, password)

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"mqtt://{user}{self.host}:{self.port}"

    def client(
        self,
        identifier: str,
        *,
        clean_session: bool = False,
        mqtt5: bool = False,
        session_expiry: int = 3600,
        **options: Any,
    ) -> aiomqtt.Client:
        """An aiomqtt client with a persistent session unless ``clean_session``: MQTT 3.1.1, or MQTT 5 (needed
        for shared subscriptions; the session then outlives a disconnect by ``session_expiry`` seconds)."""
        # small QoS 1 packets both ways (record, PUBACK, ack): Nagle's algorithm would hold them for delayed ACKs
        options.setdefault("socket_options", [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        if mqtt5:
            expiry = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            expiry.SessionExpiryInterval = 0 if clean_session else session_expiry
            options.update(protocol=aiomqtt.ProtocolVersion.V5, clean_start=clean_session, properties=expiry)
        else:
            options.update(clean_session=clean_session)
        return aiomqtt.Client(
            self.host, self.port, username=self.username, password=self.password, identifier=identifier, **options
        )


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
