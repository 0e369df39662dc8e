"""``yikatong pki ...``: the network's certificates (clearing/pki.py): create the CAs, issue a terminal's, a
clearing's or the broker's key and certificate, revoke one, refresh the CRLs and the broker ACL, write the
broker's TLS listener configuration. No key is ever printed."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from yikatong.argtypes import Subcommands, city_code, command_group, file_path, positive, tcp_port
from yikatong.errors import CliError

if TYPE_CHECKING:
    from clearing.pki import Identity, Pki

DEFAULT_PKI = Path("pki")
_LAYOUT = (
    "Folder layout: index.json (every certificate issued), chain.pem (root + city CAs: Mosquitto's cafile), "
    "crl.pem (every CA's CRL: crlfile), acl (acl_file), ca/root/ and ca/CITY/ (cert.pem, key.pem 0600, crl.pem), "
    "devices/KIND-NAME/ (cert.pem: the device then its CA; key.pem 0600; ca.pem: the root). "
    "See docs/terminal-identity.md."
)


def register(groups: Subcommands) -> None:
    """Add the ``pki`` command group."""
    sub = command_group(
        groups,
        "pki",
        help_text="the network's certificates: CAs, terminal / clearing / broker certificates, revocation, CRL",
        description="A small PKI for the city network: one root CA, a CA per city, a certificate per terminal "
        "(CN terminal:NUMBER) and clearing (CN clearing:CITY) from its city's CA, and the broker's from the root. "
        + _LAYOUT,
    )

    init = sub.add_parser(
        "init",
        help="create the root CA and a CA per city (adds missing cities to an existing folder)",
        description="Create the network root CA and a CA for each --city (default: the demo cities 4510 4530 4560) "
        "in --out. Keys already there are kept: run it again with another --city to add a city. " + _LAYOUT,
        epilog="Example: yikatong pki init --out pki --city 4510 --city 4560",
    )
    init.add_argument("--out", type=file_path, default=DEFAULT_PKI, help="the PKI folder (default: pki)")
    init.add_argument(
        "--city", type=city_code, action="append", help="a city to give a CA (repeat; default 4510 4530 4560)"
    )
    init.set_defaults(run=_init)

    issue = sub.add_parser(
        "issue",
        help="a new key and certificate for a terminal, a clearing or the broker",
        description="Generate a key (EC P-256, written 0600, never printed) and a certificate: --terminal NUMBER "
        "(CN terminal:NUMBER, from the CA of the city in its first 4 digits, client auth, 30 days), --clearing CITY "
        "(CN clearing:CITY, client auth, 90 days) or --server HOST (the broker: from the root, server auth, the host "
        "as DNS or IP subject alternative name, 365 days). Files go to --out (default PKI/devices/KIND-NAME): "
        "cert.pem, key.pem, ca.pem, what 'terminal --tls-dir' takes. The broker ACL is rewritten; send the broker "
        "SIGHUP to read it.",
        epilog="Example: yikatong pki issue --terminal 456000000777 --pki pki",
    )
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--terminal", type=_identity("terminal"), metavar="NUMBER", help="12 hex digits, e.g. 456000000777"
    )
    who.add_argument("--clearing", type=_identity("clearing"), metavar="CITY", help="a city code, e.g. 4560")
    who.add_argument("--server", type=_identity("server"), metavar="HOST", help="the broker's host name or IP address")
    _pki_option(issue)
    issue.add_argument("--days", type=positive, help="validity in days (default: terminal 30, clearing 90, server 365)")
    issue.add_argument("--out", type=file_path, help="folder for the files (default PKI/devices/KIND-NAME)")
    issue.set_defaults(run=_issue)

    revoke = sub.add_parser(
        "revoke",
        help="revoke a certificate by serial: into its CA's CRL and out of the ACL",
        description="Record the revocation in index.json, rewrite the CRLs (crl.pem) and the ACL. The broker "
        "applies both after SIGHUP (docs/terminal-identity.md). 'pki list' shows the serials.",
        epilog="Example: yikatong pki revoke 5F3A9C... --pki pki && kill -HUP $(pidof mosquitto)",
    )
    revoke.add_argument("serial", help="the certificate's serial in hex (as 'pki list' or 'openssl x509 -serial')")
    _pki_option(revoke)
    revoke.set_defaults(run=_revoke)

    crl = sub.add_parser(
        "crl",
        help="write fresh CRLs (valid 7 days) and the ACL (expired certificates drop out)",
        description="Sign a new CRL for every CA and rewrite crl.pem, and rewrite the ACL. A CRL is valid 7 days; "
        "once it has expired the broker refuses every client, so run this daily (cron) and send the broker SIGHUP.",
    )
    _pki_option(crl)
    crl.set_defaults(run=_crl)

    show = sub.add_parser("list", help="every certificate issued: serial, subject, CA, validity, revoked")
    _pki_option(show)
    show.set_defaults(run=_list)

    conf = sub.add_parser(
        "mosquitto-conf",
        help="write the broker's TLS listener configuration (mosquitto.conf lines)",
        description="Write the mosquitto.conf lines of a TLS listener that requires a certificate of this network, "
        "takes its CN as the username, checks the CRL and applies the ACL, with the absolute paths of this PKI's "
        "files. Include it from mosquitto.conf (include_dir) or append it.",
        epilog="Example: yikatong pki issue --server broker.example --pki pki && "
        "yikatong pki mosquitto-conf --server broker.example --pki pki --out /etc/mosquitto/conf.d/yikatong-tls.conf",
    )
    conf.add_argument("--server", type=_identity("server"), required=True, metavar="HOST", help="the broker's host")
    _pki_option(conf)
    conf.add_argument("--port", type=tcp_port, default=8883, help="listener port (default 8883)")
    conf.add_argument("--bind", help="listen on this address only (default: every address)")
    conf.add_argument("--out", type=file_path, required=True, help="the file to write ('-': standard output)")
    conf.set_defaults(run=_mosquitto_conf)


def _pki_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pki", type=file_path, default=DEFAULT_PKI, help="the PKI folder (default: pki)")


def _identity(kind: str) -> Callable[[str], Identity]:
    def parse(text: str) -> Identity:
        from clearing.pki import Identity, PkiError

        try:
            return {"terminal": Identity.terminal, "clearing": Identity.clearing, "server": Identity.server}[kind](text)
        except PkiError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _open(folder: Path) -> Pki:
    from clearing.pki import Pki, PkiError

    try:
        return Pki(folder)
    except PkiError as err:
        raise CliError(str(err)) from None


def _init(args: argparse.Namespace) -> int:
    from clearing.pki import DEMO_CITIES, Pki

    try:
        pki = Pki.create(args.out, args.city or DEMO_CITIES)
    except OSError as err:
        raise CliError(f"{args.out}: {err.strerror or err}") from None
    print(f"PKI in {args.out}: root CA and city CAs {' '.join(pki.cities())}; broker files chain.pem crl.pem acl")
    return 0


def _issue(args: argparse.Namespace) -> int:
    from clearing.pki import PkiError

    pki = _open(args.pki)
    identity = args.terminal or args.clearing or args.server
    try:
        issued, folder = pki.issue(identity, days=args.days, out=args.out)
    except PkiError as err:
        raise CliError(str(err)) from None
    except OSError as err:
        raise CliError(f"{err.filename or args.out}: {err.strerror or err}") from None
    print(
        f"issued {issued.subject} serial {issued.serial} by CA {issued.ca}, valid until {issued.not_after}: "
        f"{folder}/cert.pem key.pem (0600) ca.pem"
    )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from clearing.pki import PkiError

    pki = _open(args.pki)
    try:
        entry = pki.revoke(args.serial)
    except PkiError as err:
        raise CliError(str(err)) from None
    print(
        f"revoked {entry.subject} serial {entry.serial} at {entry.revoked}: "
        "crl.pem and acl rewritten; SIGHUP the broker"
    )
    return 0


def _crl(args: argparse.Namespace) -> int:
    pki = _open(args.pki)
    pki.write_crls()
    pki.write_acl()
    print(f"CRLs of {len(pki.cities()) + 1} CAs written to {args.pki}/crl.pem, ACL rewritten; SIGHUP the broker")
    return 0


def _list(args: argparse.Namespace) -> int:
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    for e in _open(args.pki).index():
        state = f"revoked {e.revoked}" if e.revoked else "valid" if e.valid_at(now) else "expired"
        print(f"{e.serial:>32}  {e.subject:<24} CA {e.ca:<5} {e.not_before} .. {e.not_after}  {state}")
    return 0


def _mosquitto_conf(args: argparse.Namespace) -> int:
    from clearing.pki import PkiError

    pki = _open(args.pki)
    try:
        text = pki.mosquitto_listener(args.pki / "devices" / args.server.folder, args.port, args.bind)
    except PkiError as err:
        raise CliError(str(err)) from None
    if str(args.out) == "-":
        print(text, end="")
        return 0
    try:
        args.out.write_text(text)
    except OSError as err:
        raise CliError(f"{args.out}: {err.strerror or err}") from None
    print(f"TLS listener on port {args.port} written to {args.out}")
    return 0
