"""PC/SC reader (pyscard): a real reader, or the vpcd virtual one, behind the Reader interface."""

from __future__ import annotations

import contextlib
import time

from smartcard import scard
from smartcard.Exceptions import CardConnectionException, NoCardException
from smartcard.scard import SCARD_PROTOCOL_T1
from smartcard.System import readers as pcsc_readers

from terminals.reader import CardGone


class ReaderNotFound(Exception):
    """No PC/SC reader of that name (the message lists the readers there are)."""


def list_readers() -> list[str]:
    """Names of the PC/SC readers pcscd knows; empty when pcscd has none (or is not running)."""
    try:
        return [str(r) for r in pcsc_readers()]
    except Exception:  # pyscard raises its own base types when pcscd is absent
        return []


class PcscReader:
    """A PC/SC reader by name (exact, or a unique prefix such as 'Virtual PCD')."""

    def __init__(self, name: str) -> None:
        available = {str(r): r for r in pcsc_readers()}
        matches = [n for n in available if n == name] or [n for n in available if n.startswith(name)]
        if len(matches) != 1:
            raise ReaderNotFound(
                f"reader {name!r} {'is ambiguous' if matches else 'not found'}; "
                f"readers: {', '.join(available) or 'none'}"
            )
        self.name = matches[0]
        self._reader = available[self.name]
        self._conn = None

    def wait_for_card(self, timeout: float) -> bytes:
        """Poll until a card is present and connected; returns its ATR. TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.connect()
            except CardGone:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no card on {self.name} after {timeout:.0f} s") from None
                time.sleep(0.1)

    def card_present(self) -> bool:
        """Whether a card is in the reader now (PC/SC status, without connecting to it)."""
        hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if hresult != scard.SCARD_S_SUCCESS:
            return False
        try:
            hresult, states = scard.SCardGetStatusChange(context, 0, [(self.name, scard.SCARD_STATE_UNAWARE)])
            return hresult == scard.SCARD_S_SUCCESS and bool(states[0][1] & scard.SCARD_STATE_PRESENT)
        finally:
            scard.SCardReleaseContext(context)

    def wait_for_removal(self, timeout: float) -> bool:
        """Poll until the card has left the reader (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while self.card_present():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def connect(self) -> bytes:
        """Connect (T=1) to the card in the reader; CardGone when there is none."""
        self.disconnect()
        conn = self._reader.createConnection()
        try:
            conn.connect(SCARD_PROTOCOL_T1)
            atr = bytes(conn.getATR())
        except (NoCardException, CardConnectionException) as err:
            raise CardGone(f"{self.name}: no card ({err})") from err
        self._conn = conn
        return atr

    def transmit(self, apdu: bytes) -> bytes:
        """Send a C-APDU; a card removed mid-transaction surfaces as CardGone."""
        if self._conn is None:
            raise CardGone(f"{self.name}: not connected")
        try:
            data, sw1, sw2 = self._conn.transmit(list(apdu))
        except CardConnectionException as err:
            raise CardGone(f"{self.name}: card removed ({err})") from err
        return bytes(data) + bytes([sw1, sw2])

    def disconnect(self) -> None:
        """Release the card."""
        if self._conn is not None:
            with contextlib.suppress(CardConnectionException):
                self._conn.disconnect()
            self._conn = None
