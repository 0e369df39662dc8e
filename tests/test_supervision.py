"""Long-running commands never linger half-alive: a task that dies ends the command with exit 1."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from terminals.mqtt import BrokerUrl
from yikatong import terminal_cli


class NoCard:
    """A reader with no card on it, ever."""

    def card_present(self) -> bool:
        return False


class DyingUplink:
    """An uplink whose task fails with a bug after a moment."""

    def __init__(self, *_args: Any) -> None:
        pass

    async def run(self) -> None:
        await asyncio.sleep(0.2)
        raise RuntimeError("a bug in the uplink")


async def test_terminal_run_stops_when_its_uplink_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, the tap loop went on without an uplink: records piled up in the outbox, nothing said why."""
    monkeypatch.setattr("terminals.uplink.Uplink", DyingUplink)  # (terminal_cli imports it from there when it runs)
    loop = terminal_cli._run_loop(None, NoCard(), BrokerUrl("127.0.0.1", 1), None)  # type: ignore[arg-type]
    with pytest.raises(terminal_cli.UplinkDied) as died:
        await asyncio.wait_for(loop, timeout=10)
    assert isinstance(died.value.__cause__, RuntimeError)
