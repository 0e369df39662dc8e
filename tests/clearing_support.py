"""Clearing test helpers: fresh databases (SQLite file or a new PostgreSQL database), an in-process clearing
service, signed records, and the `yikatong clearing serve` process for the kill tests."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from mqtt_support import eventually, running, unique_terminal
from sqlalchemy import func, select, text
from support import KEYS
from terminal_support import make_terminal

from cardsim.issuer import IssuerHost
from clearing.db import migrate, open_engine
from clearing.intake import Intake
from clearing.ledger import LEDGER, QUARANTINE, Ledger
from clearing.service import ClearingService
from terminals.messages import TxnRecord
from terminals.mqtt import BrokerUrl
from terminals.terminal import Terminal
from yikatong.synthetic import SyntheticTerminal, synthetic_cards

HOST = IssuerHost(KEYS)
CHINA = dt.timezone(dt.timedelta(hours=8))
DAY_START = dt.datetime(2026, 11, 24, 8, 0, tzinfo=CHINA)
PG_ADMIN = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "database": "postgres"}


async def require_postgres() -> None:
    """Fail (not skip) when PostgreSQL is not there: scripts/services.sh starts it."""
    try:
        conn = await asyncpg.connect(**PG_ADMIN, timeout=5)
    except (OSError, asyncpg.PostgresError) as err:
        raise AssertionError(f"PostgreSQL not usable on 127.0.0.1:5432 ({err}): run scripts/services.sh") from err
    await conn.close()


@contextlib.asynccontextmanager
async def fresh_db(kind: str, folder: Path) -> AsyncIterator[str]:
    """The URL of an empty database: a SQLite file in ``folder``, or a new PostgreSQL database (dropped after)."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / f'clearing-{secrets.token_hex(3)}.sqlite'}"
        return
    await require_postgres()
    name = f"yikatong_test_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(**PG_ADMIN)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


@contextlib.asynccontextmanager
async def clearing(broker: BrokerUrl, db: str, city: str, **options: Any) -> AsyncIterator[ClearingService]:
    """A clearing service of ``city`` running in this process (a fresh MQTT session) until the block ends."""
    engine = open_engine(db)
    await migrate(engine)
    options.setdefault("worker", f"test-{secrets.token_hex(3)}")
    options.setdefault("persistent", False)  # no session left behind on the machine's broker
    service = ClearingService(broker, Ledger(engine, city), Intake(city, HOST), **options)
    try:
        async with running(service.run()):
            await eventually(lambda: service.stats.connected)
            yield service
    finally:
        await engine.dispose()


def loaded_terminal(state: Path, city: str, count: int, issuers: tuple[str, ...], seed: int = 1) -> Terminal:
    """A terminal (unique number) whose outbox holds ``count`` signed records, as if it had run offline. Give
    each terminal of a test its own ``seed``: the same cards at two terminals would be clones."""
    term = make_terminal(state, city=city, terminal=unique_terminal(city))
    for record in signed_records(count, city, term.terminal_hex, issuers, seed=seed):
        term.outbox.append(record)
    return term


def signed_records(
    count: int,
    city: str,
    terminal: str,
    issuers: tuple[str, ...] = ("4510", "4560", "4530"),
    cards: int = 20,
    seed: int = 1,
) -> list[TxnRecord]:
    """``count`` signed purchase records of one synthetic terminal, over ``cards`` cards of ``issuers``."""
    fleet = synthetic_cards(cards, list(issuers), seed)
    term = SyntheticTerminal(HOST, city, terminal, DAY_START)
    return [term.purchase(fleet[i % len(fleet)], 100 + i % 7 * 50) for i in range(count)]


async def table_counts(db: str, city: str) -> dict[str, int]:
    """Ledger rows, distinct identities, quarantine rows and forward states of ``city``."""
    engine = open_engine(db)
    try:
        async with engine.connect() as conn:
            ledger = (await conn.execute(select(func.count()).where(LEDGER.c.city == city))).scalar_one()
            distinct = (
                await conn.execute(
                    text(
                        "SELECT COUNT(*) FROM (SELECT DISTINCT issuer, card, kind, card_counter FROM ledger "
                        "WHERE city = :city) AS d"
                    ),
                    {"city": city},
                )
            ).scalar_one()
            quarantine = (await conn.execute(select(func.count()).where(QUARANTINE.c.city == city))).scalar_one()
        return {"ledger": ledger, "distinct": distinct, "quarantine": quarantine, **await Ledger(engine, city).counts()}
    finally:
        await engine.dispose()


@dataclass
class ServeProcess:
    """A running `yikatong clearing serve` and its output file."""

    proc: subprocess.Popen[str]
    log: Path

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM, then the number of records it stored by its own final line."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)
        found = re.findall(r"clearing \d{4}: ([\d,]+) stored", self.log.read_text())
        assert found, f"no final stats line: {self.log.read_text()}"
        return int(found[-1].replace(",", ""))


@contextlib.contextmanager
def serve_process(broker: BrokerUrl, db: str, city: str, worker: str, *extra: str) -> Iterator[ServeProcess]:
    """`yikatong clearing serve` as its own process, waited for until it is subscribed; killed after."""
    log_path = Path(tempfile.gettempdir()) / f"serve-{worker}-{secrets.token_hex(3)}.log"
    command = [sys.executable, "-m", "yikatong.cli", "clearing", "serve", "--city", city, "--broker", str(broker)]
    command += ["--db", db, "--worker", worker, "--report-every", "1", *extra]
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while "connected to" not in log_path.read_text():
            assert proc.poll() is None, f"clearing serve exited: {log_path.read_text()}"
            assert time.monotonic() < deadline, f"clearing serve did not connect: {log_path.read_text()}"
            time.sleep(0.05)
        yield ServeProcess(proc, log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
