"""A local certificate authority for the stacks ``zhuge services`` runs: one CA per state dir.

Made with ``openssl`` (EC P-256 keys), it signs the Kafka broker's and Redis's
server certificates (for 127.0.0.1 and localhost) and, for mutual TLS, client
certificates; its certificate is what clients put in ``ZHUGE_*_SSL_CAFILE``.
Keys and anything that may hold a secret are written mode 0600.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from app.service_errors import MissingTool, ServiceError

Echo = Callable[[str], None]
CA_DAYS, CERT_DAYS = 3650, 825


def write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by this user only (the file may hold a secret)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(text)


@dataclass(frozen=True)
class LocalCA:
    """The local CA: signs every server and client certificate of the stacks under one state dir."""

    cert: Path
    key: Path


_OPENSSL_CNF = """\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = ${ENV::ZHUGE_SAN}
"""
_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def run_openssl(*args: str | Path, env: dict[str, str] | None = None) -> None:
    if shutil.which("openssl") is None:
        raise MissingTool("openssl")
    result = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise ServiceError(f"openssl {args[0]} failed:\n{(result.stdout + result.stderr)[-2000:]}")


def local_ca(root: Path) -> LocalCA:
    """The CA kept in ``root`` (``<state_dir>/services/ca``), made there once (key mode 0600)."""
    ca = LocalCA(root / "ca.pem", root / "ca.key")
    root.mkdir(parents=True, exist_ok=True)
    cnf = root / "openssl.cnf"  # rewritten each time: a newer zhuge may issue other extensions
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two stacks starting at once make one CA
        cnf.write_text(_OPENSSL_CNF)
        if ca.cert.exists() and ca.key.exists():
            return ca
        key, cert = root / "ca.key.tmp", root / "ca.pem.tmp"
        run_openssl("req", "-x509", "-new", *_EC_KEY, "-keyout", key, "-out", cert, "-days", str(CA_DAYS),
                 "-subj", f"/CN=zhuge local CA {uuid.uuid4().hex[:8]}", "-config", cnf, "-extensions", "ca",
                 env={"ZHUGE_SAN": "DNS:localhost"})  # fmt: skip
        key.chmod(0o600)
        key.rename(ca.key)
        cert.rename(ca.cert)
    return ca


def _san(hosts: Iterable[str]) -> str:
    entries = []
    for host in dict.fromkeys(hosts):
        try:
            entries.append(f"IP:{ipaddress.ip_address(host)}")
        except ValueError:
            entries.append(f"DNS:{host}")
    return ",".join(entries)


def issue_cert(ca: LocalCA, cert: Path, key: Path, hosts: Iterable[str]) -> None:
    """A certificate for ``hosts`` (server and client use), signed by ``ca``; key mode 0600."""
    hosts = list(hosts)
    cert.parent.mkdir(parents=True, exist_ok=True)
    key.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cert.parent) as tmp:
        csr, new_key, cnf = Path(tmp) / "req.csr", Path(tmp) / "key.pem", ca.cert.parent / "openssl.cnf"
        env = {"ZHUGE_SAN": _san(hosts)}
        run_openssl("req", "-new", *_EC_KEY, "-keyout", new_key, "-out", csr, "-subj", f"/CN={hosts[0]}",
                 "-config", cnf, env=env)  # fmt: skip
        run_openssl("x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-set_serial", f"0x{secrets.token_hex(16)}",
                 "-days", str(CERT_DAYS), "-extfile", cnf, "-extensions", "leaf", "-out", cert, env=env)  # fmt: skip
        new_key.chmod(0o600)
        new_key.replace(key)


def _pem_blocks(text: str) -> set[str]:
    return {"".join(b.split()) for b in re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)}


def export_ca(ca: LocalCA, target: str, setting: str, echo: Echo) -> None:
    """Write the CA certificate to ``target`` for clients, unless there; refuse a file that lacks our CA."""
    path = Path(target).expanduser()
    ours = ca.cert.read_text()
    if path.exists():
        if _pem_blocks(ours) <= _pem_blocks(path.read_text(errors="replace")):
            return
        raise ServiceError(
            f"{setting}={target} exists but does not hold the local CA of this state dir ({ca.cert}): "
            f"delete it so that zhuge writes the CA there, or point {setting} at a new file"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(ours)
    echo(f"wrote the local CA certificate to {target} ({setting})")


def client_cert(ca: LocalCA, certfile: str, keyfile: str, prefix: str, echo: Echo) -> None:
    """Issue a client certificate at ``certfile``/``keyfile`` when both are missing; refuse one our CA did not sign."""
    cert, key = Path(certfile).expanduser(), Path(keyfile).expanduser()
    if not cert.exists() and not key.exists():
        issue_cert(ca, cert, key, ["zhuge-client"])
        echo(f"issued a client certificate from the local CA: {certfile}, {keyfile}")
        return
    if not (cert.exists() and key.exists()):
        raise ServiceError(f"{prefix}_CERTFILE and {prefix}_KEYFILE: one exists, the other not; delete both or provide both")
    result = subprocess.run(["openssl", "verify", "-CAfile", str(ca.cert), str(cert)], capture_output=True, text=True)
    if result.returncode != 0:
        raise ServiceError(f"{prefix}_CERTFILE={certfile} is not signed by the local CA ({ca.cert}): delete both files "
                           "so that zhuge issues new ones")  # fmt: skip
