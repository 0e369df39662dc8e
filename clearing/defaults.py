"""The clearing's tunable defaults, in a module of their own so that the command line can show them in its help
without importing the database and MQTT layers that use them."""

from __future__ import annotations

from typing import Final

QUARANTINE_CAP: Final = 1000
"""Refused messages kept per sender and day; the rest are only counted."""
HEALTH_EVERY: Final = 5.0
"""Seconds between the clearing's retained health messages (wire.md: at least every 10 s)."""
DEFAULT_GRACE: Final = 600
"""Seconds after a hotlist version's publish time from which the acquirer's terminals are expected to hold it."""
