"""Process set-up shared by the commands that run until stopped: log lines on stderr, SIGTERM handled like
Ctrl-C, and clearing services started as child processes."""

from __future__ import annotations

import contextlib
import logging
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from yikatong.errors import CliError

if TYPE_CHECKING:
    from terminals.mqtt import BrokerUrl


def setup_logging(level: int) -> None:
    """``yikatong: message`` lines on stderr from ``level`` up (the product's loggers included)."""
    logging.basicConfig(level=level, format="yikatong: %(message)s", stream=sys.stderr)
    for package in ("terminals", "clearing"):
        logging.getLogger(package).setLevel(level)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM (and SIGINT, even where it was ignored) raise KeyboardInterrupt, so a long-running command
    stops as cleanly on ``kill`` as on Ctrl-C."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)


@dataclass(frozen=True)
class ClearingWorker:
    """One ``yikatong clearing serve`` process to start: its city, the broker it answers on, its name among the
    city's workers ("" when it is the city's only one), the port of its Prometheus metrics and further options
    (``--jetstream URLS``)."""

    city: str
    broker: BrokerUrl
    name: str = ""
    metrics_port: int | None = None
    options: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """CITY, or CITY-NAME for one of several workers: its log file and its metrics are called so."""
        return f"{self.city}-{self.name}" if self.name else self.city


@contextlib.contextmanager
def clearing_processes(
    workers: Sequence[ClearingWorker],
    db: Callable[[str], str],
    logs: Path,
    timeout: float = 60.0,
    session_expiry: int | None = None,
    pki: Path | None = None,
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``yikatong clearing serve`` for each of ``workers`` as its own process (a core of its own), waited for until
    each is connected; stopped with SIGTERM (then killed) on the way out. Output goes to
    ``logs/clearing-LABEL.log``. With ``session_expiry`` they speak MQTT 5 and leave no session on the broker that
    long after the run. Over an ``mqtts://`` broker, ``pki`` is the PKI folder: each connects with its city's
    clearing certificate and checks the terminals' signatures (required over mqtts) against the CAs and the
    PKI's CRL."""
    from clearing.pki import Identity

    procs: list[subprocess.Popen[bytes]] = []
    # a worker name of this run: a fixed MQTT identity would resume a stale session full of other runs' records
    run = f"run-{secrets.token_hex(3)}"
    paths = [logs / f"clearing-{worker.label}.log" for worker in workers]
    try:
        for worker, path in zip(workers, paths, strict=True):
            name = f"{run}-{worker.name}" if worker.name else run
            command = [sys.executable, "-m", "yikatong.cli", "clearing", "serve", "--city", worker.city]
            command += ["--broker", _with_password(worker.broker), "--db", db(worker.city), "--report-every", "0"]
            command += ["--worker", name, *worker.options]
            if session_expiry is not None:
                command += ["--session-expiry", str(session_expiry)]
            if pki is not None:
                folder = pki / "devices" / Identity.clearing(worker.city).folder
                command += ["--tls-dir", str(folder), "--crl", str(pki / "crl.pem")]
            if worker.metrics_port is not None:
                command += ["--metrics-port", str(worker.metrics_port)]
            with path.open("wb") as log:
                procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        for proc, path, worker in zip(procs, paths, workers, strict=True):
            while "connected to" not in path.read_text(errors="replace"):
                if proc.poll() is not None:
                    raise CliError(
                        f"the clearing process stopped at start (exit code {proc.returncode}; {_last_line(path)}): "
                        f"see {path}"
                    )
                if time.monotonic() > deadline:
                    raise CliError(
                        f"the clearing process did not connect to {worker.broker} in {timeout:.0f} s: see {path}"
                    )
                time.sleep(0.05)
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _with_password(broker: BrokerUrl) -> str:
    """The broker URL with its password, for a child's command line (``str`` leaves the password out)."""
    if broker.username is None:
        return str(broker)
    secret = f":{quote(broker.password, safe='')}" if broker.password else ""
    scheme = "mqtts" if broker.secure else "mqtt"
    return f"{scheme}://{quote(broker.username, safe='')}{secret}@{broker.host}:{broker.port}"


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"
