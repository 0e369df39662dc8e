"""The PN532 board as the commands use it (``terminal tap|run --pn532``, ``audit nested|chips --pn532``): opened
once, a failure to open it a ``CliError``, and the cards presented on it one at a time (``Pn532Board``).

pyserial and the driver are imported only when a board is opened: ``--help`` starts without them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING

from yikatong.errors import CliError

if TYPE_CHECKING:
    from terminals.pn532 import Pn532Link


def open_pn532_board(device: str) -> Pn532Link:
    """The PN532 board on the serial ``device``, awake and checked; CliError when it cannot be opened or does not
    answer as a PN532."""
    from terminals.pn532 import Pn532Error, open_pn532

    try:
        return open_pn532(device)
    except Pn532Error as err:
        raise CliError(str(err)) from err


@contextlib.contextmanager
def pn532_with_card(device: str, wait: float) -> Iterator[Pn532Link]:
    """The board at ``device`` with a card selected in its field, closed on every way out. CliError when there is
    no card within ``wait`` s, or when the board fails (a ``Pn532Error`` the body lets out included)."""
    from terminals.pn532 import Pn532Error

    with open_pn532_board(device) as link:
        try:
            if not link.wait_for_card(wait):
                raise CliError(f"no card on the PN532 at {device} after {wait:g} s")
            yield link
        except Pn532Error as err:
            raise CliError(f"the PN532 at {device}: {err}") from err


class Pn532Board:
    """A PN532 board where cards are presented one at a time. Its methods raise ``Pn532Error`` (an ``M1Gone``)
    when the board fails: each command decides what that means (stop the terminal, write the audit so far)."""

    def __init__(self, device: str) -> None:
        self.link = open_pn532_board(device)
        self.name = f"the PN532 at {device}"

    def card_present(self) -> bool:
        """Whether a card is in the field now (one poll; a card found is selected)."""
        return self.link.list_target() is not None

    def wait_for_card(self, timeout: float) -> None:
        """Until a card is selected in the field; TimeoutError after ``timeout`` s."""
        if not self.link.wait_for_card(timeout):
            raise TimeoutError(f"no card on {self.name} after {timeout:g} s")

    def wait_for_removal(self, timeout: float) -> bool:
        """True once the card selected last has left the field (False after ``timeout`` s)."""
        return self.link.wait_for_removal(timeout)

    def close(self) -> None:
        """Field off, port closed."""
        self.link.close()

    def __enter__(self) -> Pn532Board:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
