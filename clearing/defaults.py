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
ACK_WAIT: Final = 10.0
"""Seconds before a record a JetStream worker took and never acked goes to another worker: one that died, or whose
pull was on a node that died with the records on the way (30 s held those that long in the recovery bench); a
commit slower than this only brings its records again, as duplicates."""
