"""X.509 credentials for the security tests, made with ``openssl`` (Debian's openssl package).

:func:`make_credentials` builds, under one directory, credentials directories
laid out as QEMU's ``tls-creds-x509``, nbdkit's ``--tls-certificates`` and
libnbd's ``tls-certificates=`` expect (:mod:`isc.tls`):

==============  ==============================================================
``good``        the test CA, a server certificate for localhost, 127.0.0.1 and
                ::1, and a client certificate: serves both ends
``other-ca``    the same layout from another CA: its client is unknown to
                ``good``'s servers, and it trusts none of their certificates
``expired``     ``good``'s CA, with server and client certificates that expired
``no-client``   ``good``'s CA alone: a client without a certificate
==============  ==============================================================

EC P-256 keys keep it fast (well under a second for all of it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

EXTENSIONS = """
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
[client]
basicConstraints = critical, CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


def _openssl(*args: str | Path) -> None:
    done = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode:
        raise AssertionError(f"openssl {args[0]} failed: {done.stderr}")


def _key(path: Path) -> Path:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    path.chmod(0o600)
    return path


def _ca(directory: Path, name: str, config: Path) -> tuple[Path, Path]:
    key = _key(directory / "ca-key.pem")
    cert = directory / "ca-cert.pem"
    _openssl(
        "req", "-x509", "-new", "-key", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-config", config, "-extensions", "ca",
    )  # fmt: skip
    return cert, key


def _issue(ca: tuple[Path, Path], role: str, cert: Path, config: Path, days: str = "2") -> None:
    """A ``role`` ("server" or "client") certificate at ``cert``, its key beside it."""
    key = _key(cert.with_name(f"{role}-key.pem"))
    request = cert.with_suffix(".csr")
    _openssl("req", "-new", "-key", key, "-out", request, "-subj", f"/CN=isc test {role}")
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", days, "-extfile", config, "-extensions", role,
    )  # fmt: skip
    request.unlink()


def make_credentials(base: Path) -> dict[str, Path]:
    """Make the credentials directories the module docstring lists; return them by name."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed; it comes with the Debian package openssl")
    config = base / "extensions.cnf"
    config.write_text("[req]\ndistinguished_name = dn\n[dn]\n" + EXTENSIONS)
    dirs = {name: base / name for name in ("good", "other-ca", "expired", "no-client")}
    for path in dirs.values():
        path.mkdir(mode=0o700)
    authorities = base / "authorities"
    authorities.mkdir()
    for name, ca_name in (("good", "isc test CA"), ("other-ca", "another CA")):
        ca_dir = authorities / name
        ca_dir.mkdir()
        ca = _ca(ca_dir, ca_name, config)
        shutil.copy(ca[0], dirs[name] / "ca-cert.pem")
        for role in ("server", "client"):
            _issue(ca, role, dirs[name] / f"{role}-cert.pem", config)
        if name == "good":
            for role in ("server", "client"):
                # -days -1: valid from now until a day ago, so expired from the start.
                _issue(ca, role, dirs["expired"] / f"{role}-cert.pem", config, days="-1")
            for copy in ("expired", "no-client"):
                shutil.copy(ca[0], dirs[copy] / "ca-cert.pem")
    return dirs
