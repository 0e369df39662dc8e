"""Argument types shared by the subcommands (argparse turns their ArgumentTypeError into exit code 2), the
parser helpers they share (command groups, the --db option), and the key-file loader."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from terminals.limits import MAX_FEN
from yikatong.errors import CliError

if TYPE_CHECKING:
    from cardsim.keys import IssuerKeyStore
    from terminals.mqtt import BrokerUrl

_HEX = set("0123456789abcdefABCDEF")
_WHOLE = re.compile(r"\+?([0-9]+)")  # ASCII digits: isdigit() and int() take other scripts' too

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # (not subscriptable at run time)
"""What ``add_subparsers`` returns: where a command or a command group registers its parsers."""


def hex_number(digits: int) -> Callable[[str], int]:
    """An argument of exactly ``digits`` hex digits (an optional 0x prefix allowed), as an integer."""

    def parse(text: str) -> int:
        cleaned = text.strip().removeprefix("0x").removeprefix("0X")
        if len(cleaned) != digits or not set(cleaned) <= _HEX:
            raise argparse.ArgumentTypeError(f"{text!r} is not {digits} hex digits ({digits * 4} bits)")
        return int(cleaned, 16)

    return parse


MAX_SESSION_EXPIRY = 0xFFFFFFFE  # MQTT 5's 0xFFFFFFFF means "never expires"


def _whole(text: str, what: str, least: int, most: int) -> int:
    """A whole number of ASCII digits within least..most (argparse prints the reason and exits 2)."""
    bounds = f"at least {least} and at most {most}"
    match = _WHOLE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what} ({bounds})")
    digits = match[1].lstrip("0") or "0"
    if len(digits) > len(str(most)) or not least <= int(digits) <= most:  # (int() refuses 5,000 digits)
        raise argparse.ArgumentTypeError(f"{text!r} is out of range: {what} is {bounds}")
    return int(digits)


def fen(text: str) -> int:
    """A balance or limit in fen: a whole number 0..2^31-1 (what the card's 4-byte fields hold)."""
    return _whole(text, "a whole number of fen", 0, MAX_FEN)


def fen_amount(text: str) -> int:
    """A fare or top-up amount in fen: a whole number 1..2^31-1 (a transaction moves at least 1 fen and at most
    what the card's 4-byte amount field and the wire record hold)."""
    return _whole(text, "an amount in fen", 1, MAX_FEN)


def positive(text: str) -> int:
    """A count: a whole number of at least 1 (and at most 2^31-1)."""
    return _whole(text, "a whole number", 1, 2**31 - 1)


def _seconds(text: str, least: float) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not least <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from {least:g} to 86400")
    return value


def seconds(text: str) -> float:
    """A duration: a number of seconds from 0 to 86400 (NaN would wait for ever, a negative one not at all)."""
    return _seconds(text, 0)


def interval(text: str) -> float:
    """The period of something repeated: 0.05 to 86400 seconds (0 or NaN would repeat it in a tight loop)."""
    return _seconds(text, 0.05)


def session_expiry(text: str) -> int:
    """An MQTT 5 session expiry: whole seconds 0..MAX_SESSION_EXPIRY."""
    return _whole(text, "a session expiry in whole seconds", 0, MAX_SESSION_EXPIRY)


def tcp_port(text: str) -> int:
    """A TCP port, 0..65535 (0: any free one, where the command says so)."""
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0 to 65535; 0: any free one)")
    return int(text)


def city_code(text: str) -> str:
    """A 4-digit city code (GB/T 13497), e.g. 4510."""
    if not re.fullmatch(r"[0-9]{4}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a 4-digit city code such as 4510")
    return text


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:60] + "...")


def file_path(text: str) -> Path:
    """A file or folder name, existing or not; refused when the system cannot even look it up (a name too long
    for it, say), which would otherwise fail in the middle of the command."""
    path = Path(text)
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{_shown(text)}: {err.strerror}") from None
    return path


def broker_url(text: str) -> BrokerUrl:
    """``mqtt://[user:password@]host[:port]`` or ``mqtts://...`` (its TLS files: ``resolve_broker``)."""
    from terminals.mqtt import BrokerUrl  # (aiomqtt, paho: only for a command that is given a broker)

    try:
        return BrokerUrl.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


BROKER_HELP = "mqtt://[user:password@]host[:port], or mqtts://host[:port] (TLS, port 8883) with --tls-dir"


def broker_options(parser: argparse.ArgumentParser, *, required: bool = False, default_help: str = "") -> None:
    """``--broker`` and the TLS files an ``mqtts://`` broker needs (``resolve_broker`` joins them)."""
    parser.add_argument("--broker", type=broker_url, required=required, help=BROKER_HELP + default_help)
    tls = parser.add_argument_group("TLS, for an mqtts:// --broker (the files 'yikatong pki issue' writes)")
    tls.add_argument("--tls-dir", type=file_path, metavar="DIR", help="this device's folder: ca.pem, cert.pem, key.pem")
    tls.add_argument("--ca", type=file_path, metavar="FILE", help="CA certificate(s) the broker's is checked against")
    tls.add_argument("--cert", type=file_path, metavar="FILE", help="this device's certificate (then its CA)")
    tls.add_argument("--key", type=file_path, metavar="FILE", help="this device's TLS private key (not --keys)")


def resolve_broker(args: argparse.Namespace) -> None:
    """Give an ``mqtts://`` ``args.broker`` its TLS files (``--tls-dir``, each overridden by ``--ca/--cert/--key``),
    checked now so that a missing or mismatched file is one clear line, not a failed connection later. A command
    that takes no TLS files refuses an mqtts broker (CliError), and TLS files without an mqtts broker."""
    broker = getattr(args, "broker", None)
    if not hasattr(args, "tls_dir"):
        if broker is not None and broker.secure and not hasattr(args, "pki"):  # the demo: a PKI folder of its own
            raise CliError(f"broker {broker}: this command does not speak TLS yet (use mqtt://)")
        return
    given = {"--ca": args.ca, "--cert": args.cert, "--key": args.key}
    if broker is None or not broker.secure:
        if args.tls_dir is not None or any(given.values()):
            raise CliError("--tls-dir, --ca, --cert and --key are for an mqtts:// --broker")
        return
    import ssl

    from terminals.mqtt import TlsFiles

    if args.tls_dir is not None:
        if not args.tls_dir.is_dir():
            raise CliError(f"--tls-dir {args.tls_dir}: no such folder (the one 'yikatong pki issue' wrote)")
        base = TlsFiles.folder(args.tls_dir)
        files = TlsFiles(args.ca or base.ca, args.cert or base.cert, args.key or base.key)
    elif all(given.values()):
        files = TlsFiles(args.ca, args.cert, args.key)
    else:
        raise CliError(f"broker {broker}: mqtts:// needs --tls-dir DIR (from 'pki issue') or --ca, --cert and --key")
    for option, path in zip(given, (files.ca, files.cert, files.key), strict=True):
        if not path.is_file():
            raise CliError(f"{option} {path}: no such file")
    try:
        files.context()
    except (OSError, ssl.SSLError) as err:
        raise CliError(f"TLS files {files.cert}, {files.key}, {files.ca}: {err}") from None
    args.broker = broker.with_tls(files)


def database_url(text: str) -> str:
    """``sqlite:///FILE`` or ``postgresql+asyncpg://user@host/db``, checked before anything connects: the URL's
    form, and that a SQLite file can be where it says (a folder, or a file in a folder that does not exist, would
    only fail at connect time). The text itself is returned."""
    from sqlalchemy.engine import make_url  # (SQLAlchemy, Alembic: only for a command that opens a database)

    from clearing.db import DatabaseUrlError, async_url

    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"database {text!r}: a URL must be UTF-8 text") from None
    try:
        async_url(text)
    except DatabaseUrlError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    url = make_url(text)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") and "uri" not in url.query:
        path = file_path(url.database)
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"database {text!r}: {path} is a folder, not a SQLite file")
        if not path.parent.is_dir():
            raise argparse.ArgumentTypeError(f"database {text!r}: no such SQLite file (no folder {path.parent})")
    return text


def load_keys(path: Path | None) -> IssuerKeyStore:
    """The issuer key file, or the published test keys; CliError naming the file when it is unusable."""
    from cardsim.keys import IssuerKeyStore, KeyFileError

    try:
        return IssuerKeyStore.load(path) if path else IssuerKeyStore.test_set()
    except KeyFileError as err:
        raise CliError(str(err)) from err


def command_group(groups: Subcommands, name: str, *, help_text: str, description: str) -> Subcommands:
    """A command group, ``yikatong NAME SUBCOMMAND``: its parser, and where its subcommands are registered
    (one is required; the chosen one lands in ``NAME_command``)."""
    group = groups.add_parser(name, help=help_text, description=description)
    return group.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND", required=True)
