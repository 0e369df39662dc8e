"""The certificates of a run's simulated devices (``yikatong demo`` and ``yikatong load`` over ``mqtts://``): which
of them lack a valid one in a ``pki init`` folder, issuing those (``--issue-certificates-only``), refusing a run
that would connect without them, and the broker address each device reaches with its own folder."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from yikatong.errors import CliError

if TYPE_CHECKING:
    from clearing.pki import Identity, Pki
    from terminals.mqtt import BrokerUrl


def check_pki_options(args: argparse.Namespace) -> None:
    """--pki goes with an mqtts:// --broker or --issue-certificates-only, and they with it."""
    secure = args.broker is not None and args.broker.secure
    if (secure or args.issue_certificates_only) and args.pki is None:
        raise CliError(
            "an mqtts:// --broker and --issue-certificates-only need --pki DIR (a 'yikatong pki init' folder)"
        )
    if args.pki is not None and not (secure or args.issue_certificates_only):
        raise CliError("--pki is for an mqtts:// --broker (or --issue-certificates-only)")


def as_device(broker: BrokerUrl, pki: Path | None, device: Identity) -> BrokerUrl:
    """The broker as one device reaches it: over TLS with its own folder of the PKI, if any."""
    from terminals.mqtt import TlsFiles

    return broker if pki is None else broker.with_tls(TlsFiles.folder(pki / "devices" / device.folder))


def missing_certificates(folder: Path, devices: Sequence[Identity]) -> tuple[Pki, list[Identity]]:
    """The PKI folder and those of ``devices`` that hold no valid certificate in it."""
    from clearing.pki import Pki, PkiError

    try:
        pki = Pki(folder)
    except PkiError as err:
        raise CliError(str(err)) from err
    return pki, pki.lacking(devices)


def issue_certificates(folder: Path, devices: Sequence[Identity], whose: str) -> int:
    """``--issue-certificates-only``: a certificate for each of ``devices`` ("the demo's" terminals and clearings:
    ``whose``) that has no valid one in the PKI folder (the ACL is rewritten with them); the others are kept."""
    from clearing.pki import PkiError

    pki, missing = missing_certificates(folder, devices)
    try:
        pki.issue_all(missing)
    except PkiError as err:  # a city without a CA in the folder
        raise CliError(str(err)) from err
    print(
        f"issued {len(missing)} certificates for {whose} terminals and clearings, kept {len(devices) - len(missing)} "
        f"valid ones ({folder / 'devices'})"
    )
    if missing:
        print(f"the broker's ACL {folder / 'acl'} lists them now: start Mosquitto, or send it SIGHUP, before the run")
    return 0


def require_certificates(folder: Path, devices: Sequence[Identity], whose: str, issuing: str) -> None:
    """CliError unless the PKI folder holds a valid certificate for each of ``devices``; ``issuing`` says, quoted,
    the command line that issues them."""
    _, missing = missing_certificates(folder, devices)
    if missing:
        raise CliError(
            f"{folder} holds no valid certificate for {len(missing)} of {whose} {len(devices)} terminals and "
            f"clearings (first: {missing[0].common_name}): run {issuing}, reload the broker (SIGHUP), run again"
        )
