"""The network PKI (clearing/pki.py, ``yikatong pki``): what it issues is checked by OpenSSL's own command line
(``openssl verify`` with the chain, its purpose checks and the CRLs, ``openssl crl -text``), not only by the library
that made it; keys are 0600 from creation and never printed; bad arguments are one clear line with exit 2."""

from __future__ import annotations

import datetime as dt
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st
from support import yikatong

from clearing.pki import Identity, Pki, PkiError
from yikatong.cli import main


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki") / "pki"
    done = yikatong("pki", "init", "--out", str(folder))
    assert done.returncode == 0, done.stderr
    assert "4510 4530 4560" in done.stdout
    return folder


def _verify(pki: Path, cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``openssl verify`` of a device certificate against the root, its city CA given as untrusted."""
    intermediates = pki / "chain.pem"  # the root is in it too; -CAfile alone anchors the trust
    command = ["openssl", "verify", "-CAfile", str(pki / "ca/root/cert.pem"), "-untrusted", str(intermediates)]
    return subprocess.run([*command, *extra, str(cert)], capture_output=True, text=True, timeout=30)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def test_terminal_certificate_verifies_with_openssl_and_names_the_terminal(pki_dir: Path) -> None:
    done = yikatong("pki", "issue", "--terminal", "456000000abc", "--pki", str(pki_dir))
    assert done.returncode == 0, done.stderr
    folder = pki_dir / "devices/terminal-456000000ABC"
    checked = _verify(pki_dir, folder / "cert.pem", "-purpose", "sslclient")
    assert checked.returncode == 0 and ": OK" in checked.stdout, checked.stdout + checked.stderr
    # a client certificate is no server certificate: the extended key usage says so
    assert _verify(pki_dir, folder / "cert.pem", "-purpose", "sslserver").returncode != 0
    cert = _cert(folder / "cert.pem")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "terminal:456000000ABC"
    assert "4560" in cert.issuer.rfc4514_string()
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=30, minutes=5)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert "user terminal:456000000ABC" in (pki_dir / "acl").read_text()


def test_keys_are_0600_and_never_printed(pki_dir: Path) -> None:
    done = yikatong("pki", "issue", "--clearing", "4530", "--pki", str(pki_dir), "--days", "2")
    assert done.returncode == 0, done.stderr
    key = pki_dir / "devices/clearing-4530/key.pem"
    body = key.read_text().splitlines()[1]  # a line of the key's base64
    assert body not in done.stdout + done.stderr and "PRIVATE" not in done.stdout + done.stderr
    for path in [key, *(pki_dir / "ca").glob("*/key.pem")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    cert = _cert(pki_dir / "devices/clearing-4530/cert.pem")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "clearing:4530"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=2, minutes=5)


def test_server_certificate_is_for_server_auth_on_its_name(pki_dir: Path) -> None:
    assert yikatong("pki", "issue", "--server", "127.0.0.1", "--pki", str(pki_dir)).returncode == 0
    cert = pki_dir / "devices/server-127.0.0.1/cert.pem"
    checked = _verify(pki_dir, cert, "-purpose", "sslserver", "-verify_ip", "127.0.0.1")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert _verify(pki_dir, cert, "-purpose", "sslserver", "-verify_ip", "127.0.0.2").returncode != 0


def _crl_text(crl: Path) -> str:
    """The CRL as ``openssl crl -text`` prints it."""
    return subprocess.run(
        ["openssl", "crl", "-text", "-noout", "-in", str(crl)], capture_output=True, text=True, check=True
    ).stdout


def test_revoked_certificate_is_in_the_crl_and_out_of_the_acl(pki_dir: Path) -> None:
    pki = Pki(pki_dir)
    issued, folder = pki.issue(Identity.terminal("451000000001"))
    crl_check = ("-crl_check", "-CRLfile", str(pki_dir / "crl.pem"))
    assert _verify(pki_dir, folder / "cert.pem", *crl_check).returncode == 0
    before = _crl_text(pki_dir / "ca/4510/crl.pem")
    assert issued.serial not in before

    done = yikatong("pki", "revoke", issued.serial.lower(), "--pki", str(pki_dir))
    assert done.returncode == 0 and "revoked terminal:451000000001" in done.stdout, done.stderr
    checked = _verify(pki_dir, folder / "cert.pem", *crl_check)
    assert checked.returncode != 0 and "certificate revoked" in checked.stdout + checked.stderr
    after = _crl_text(pki_dir / "ca/4510/crl.pem")
    printed = issued.serial.zfill(len(issued.serial) + len(issued.serial) % 2)  # openssl prints whole bytes
    assert f"Serial Number: {printed}" in after and "yikatong city 4510 CA" in after
    assert _crl_number(before) + 1 == _crl_number(after)
    assert "terminal:451000000001" not in (pki_dir / "acl").read_text()
    assert "revoked" in yikatong("pki", "list", "--pki", str(pki_dir)).stdout


def _crl_number(text: str) -> int:
    lines = text.splitlines()
    return int(lines[next(n for n, line in enumerate(lines) if "CRL Number" in line) + 1].strip())


def test_crl_checking_needs_the_crl_of_each_issuing_ca(pki_dir: Path) -> None:
    """Why crl.pem holds every CA's CRL: with CRL checking on, OpenSSL refuses a certificate whose issuer has no
    CRL in the file (another city's CRL does not do), and with -crl_check_all the root's is needed too."""
    _, folder = Pki(pki_dir).issue(Identity.terminal("453000000002"))
    cert = folder / "cert.pem"
    other_city = _verify(pki_dir, cert, "-crl_check", "-CRLfile", str(pki_dir / "ca/4510/crl.pem"))
    assert other_city.returncode != 0 and "unable to get certificate CRL" in other_city.stdout + other_city.stderr
    own_city = ("-CRLfile", str(pki_dir / "ca/4530/crl.pem"))
    assert _verify(pki_dir, cert, "-crl_check", *own_city).returncode == 0
    assert _verify(pki_dir, cert, "-crl_check_all", *own_city).returncode != 0
    assert _verify(pki_dir, cert, "-crl_check_all", "-CRLfile", str(pki_dir / "crl.pem")).returncode == 0


def test_expired_certificate_fails_verification(pki_dir: Path) -> None:
    past = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    _, folder = Pki(pki_dir).issue(
        Identity.terminal("456000000003"), out=pki_dir / "expired", not_before=past, not_after=past + dt.timedelta(1)
    )
    checked = _verify(pki_dir, folder / "cert.pem")
    assert checked.returncode != 0 and "expired" in checked.stdout + checked.stderr
    assert "terminal:456000000003" not in (pki_dir / "acl").read_text()


def test_a_device_folder_is_reused_only_while_its_certificate_is_valid(tmp_path: Path) -> None:
    """(What ``demo --issue-certificates-only`` keeps.) Revoked, expired, another device's or none: issue again."""
    pki = Pki.create(tmp_path / "pki", ["4560"])
    number, other = Identity.terminal("4560000000B1"), Identity.terminal("4560000000B2")
    assert not pki.holds_valid(number)
    issued, folder = pki.issue(number)
    assert pki.holds_valid(number) and not pki.holds_valid(other)
    assert not pki.holds_valid(number, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=31))
    (folder.parent / other.folder).mkdir()
    (folder.parent / other.folder / "cert.pem").write_bytes((folder / "cert.pem").read_bytes())
    (folder.parent / other.folder / "key.pem").write_bytes((folder / "key.pem").read_bytes())
    assert not pki.holds_valid(other)  # a copy of another device's folder
    pki.revoke(issued.serial)
    assert not pki.holds_valid(number)


def test_a_fleet_is_issued_at_once_or_not_at_all(tmp_path: Path) -> None:
    """(What ``load --issue-certificates-only`` does for thousands of terminals: one index and ACL write.)"""
    pki = Pki.create(tmp_path / "pki", ["4560"])
    fleet = [Identity.terminal(f"45600000{n:04X}") for n in range(3)] + [Identity.clearing("4560")]
    with pytest.raises(PkiError, match="no CA for city 4510"):
        pki.issue_all([*fleet, Identity.terminal("4510000000C1")])
    assert pki.index() == [] and not (pki.folder / "devices").exists()  # nothing issued
    assert pki.lacking(fleet) == fleet
    made = pki.issue_all(fleet)
    assert [e.subject for e in made] == [d.common_name for d in fleet] == [e.subject for e in pki.index()]
    assert pki.lacking(fleet) == [] and all(pki.holds_valid(device) for device in fleet)
    acl = (pki.folder / "acl").read_text()
    assert all(f"user {device.common_name}" in acl for device in fleet)


def test_init_again_keeps_the_keys_and_adds_a_city(pki_dir: Path) -> None:
    root_key = (pki_dir / "ca/root/key.pem").read_bytes()
    assert main(["pki", "init", "--out", str(pki_dir), "--city", "4599"]) == 0
    assert (pki_dir / "ca/root/key.pem").read_bytes() == root_key
    assert Pki(pki_dir).cities() == ["4510", "4530", "4560", "4599"]
    assert (pki_dir / "chain.pem").read_text().count("BEGIN CERTIFICATE") == 5
    assert (pki_dir / "crl.pem").read_text().count("BEGIN X509 CRL") == 5


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["issue", "--terminal", "451000000"], "12 hex digits"),
        (["issue", "--terminal", "ABCD00000001"], "12 hex digits"),
        (["issue", "--terminal", "999900000001"], "no CA for city 9999"),
        (["issue", "--clearing", "45"], "4-digit city"),
        (["issue", "--server", "bad host"], "host name or an IP"),
        (["issue", "--terminal", "456000000001", "--clearing", "4560"], "not allowed with"),
        (["revoke", "DEADBEEF"], "no certificate with that serial"),
        (["issue", "--clearing", "4510", "--days", "0"], "at least 1"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(pki_dir: Path, args: list[str], said: str) -> None:
    done = yikatong("pki", *args, "--pki", str(pki_dir))
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().splitlines()[-1].count("error") >= 1


def test_not_a_pki_folder_is_a_clear_error(tmp_path: Path) -> None:
    done = yikatong("pki", "issue", "--clearing", "4510", "--pki", str(tmp_path))
    assert done.returncode == 2 and "not a PKI folder" in done.stderr and "pki init" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_help_explains_the_layout() -> None:
    done = yikatong("pki", "init", "--help")
    assert done.returncode == 0 and "chain.pem" in done.stdout and "crl.pem" in done.stdout


def test_mosquitto_conf_points_at_the_pki_files(pki_dir: Path, tmp_path: Path) -> None:
    Pki(pki_dir).issue(Identity.server("localhost"))
    out = tmp_path / "tls.conf"
    assert main(["pki", "mosquitto-conf", "--server", "localhost", "--pki", str(pki_dir), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    top = pki_dir.resolve()
    for wanted in [
        f"cafile {top}/chain.pem",
        f"crlfile {top}/crl.pem",
        f"acl_file {top}/acl",
        "require_certificate true",
        "use_identity_as_username true",
        "listener 8883",
        f"keyfile {top}/devices/server-localhost/key.pem",
    ]:
        assert wanted in lines
    assert main(["pki", "mosquitto-conf", "--server", "nosuch", "--pki", str(pki_dir), "--out", str(out)]) == 2


@given(st.text(max_size=16))
def test_device_names_parse_or_are_refused(text: str) -> None:
    for make in (Identity.terminal, Identity.clearing, Identity.server):
        try:
            identity = make(text)
        except PkiError as err:
            assert "\n" not in str(err)
            continue
        assert identity.name.upper() == text.upper() and "/" not in identity.folder
        assert identity.common_name.endswith(identity.name)


def test_pki_crl_signs_fresh_crls_and_drops_expired_devices_from_the_acl(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki", ["4510"])
    past = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    pki.issue(Identity.terminal("451000000009"), not_before=past, not_after=dt.datetime.now(dt.UTC) + dt.timedelta(1))
    assert "user terminal:451000000009" in (pki.folder / "acl").read_text()
    before = x509.load_pem_x509_crl((pki.folder / "ca/4510/crl.pem").read_bytes())
    assert main(["pki", "crl", "--pki", str(pki.folder)]) == 0
    after = x509.load_pem_x509_crl((pki.folder / "ca/4510/crl.pem").read_bytes())
    number = after.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    assert after.next_update_utc is not None and after.next_update_utc > dt.datetime.now(dt.UTC) + dt.timedelta(6)
    pki.write_acl(now=dt.datetime.now(dt.UTC) + dt.timedelta(2))  # as 'pki crl' two days later
    assert "terminal:451000000009" not in (pki.folder / "acl").read_text()
