"""Process set-up shared by the commands that run until stopped: log lines on stderr, and SIGTERM handled
like Ctrl-C."""

from __future__ import annotations

import logging
import signal
import sys


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
