"""Warnings about events that may repeat by the thousand (drops, fallbacks): logged now and then, not each time."""

from __future__ import annotations

import logging


def warn_now_and_then(log: logging.Logger, count: int, message: str, *args: object) -> None:
    """Log a warning for the ``count``-th time of a repeated event only the 1st, 10th and every 1,000th time: a
    flood must not flood the log too."""
    if count in (1, 10) or count % 1000 == 0:
        log.warning(message, *args)
