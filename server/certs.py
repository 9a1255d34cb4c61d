"""`python -m server.certs`: a development CA, a server certificate and one key pair per merchant.

    python -m server.certs --out certs --hosts 127.0.0.1,localhost,10.0.0.1 --merchants 3

writes certs/ca.crt, certs/ca.key, certs/server.crt (SANs from --hosts), certs/server.key and
certs/merchants/merchant_<i>{,.pub}: ECDSA P-384 keys in OpenSSH format, as Flower's SuperNode
authentication expects. Keys are written with mode 0600. Existing files are never overwritten.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.run.errors import FedshopError


def _write(path: Path, data: bytes, private: bool) -> None:
    if path.exists():
        raise FedshopError(f"{path} exists; refusing to overwrite key material (use another --out)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certificates(out: Path, hosts: list[str], days: int = 365) -> None:
    """CA + server certificate signed by it, valid for `hosts` plus 127.0.0.1 and localhost.

    The loopback names are always included: the server's own flwr CLI and ServerApp reach the
    SuperLink's HTTP API over 127.0.0.1 with the same certificate.
    """
    hosts = list(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedshop development CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / "server.key", _pem_key(key), private=True)
    _write(out / "server.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_merchant_key(out: Path, name: str) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format (private `name`, public `name.pub`); returns the .pub path."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write(out / name, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                         serialization.NoEncryption()), private=True)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out / f"{name}.pub", pub + f" {name}\n".encode(), private=False)
    return out / f"{name}.pub"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(prog="python -m server.certs", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("certs"))
    ap.add_argument("--hosts", default="127.0.0.1,localhost",
                    help="comma-separated IPs / DNS names the server is reached at (certificate SANs)")
    ap.add_argument("--merchants", type=int, default=0, help="how many merchant key pairs to create")
    ap.add_argument("--skip-ca", action="store_true", help="only create merchant keys")
    ap.add_argument("--days", type=int, default=365)
    a = ap.parse_args(argv)
    try:
        if not a.skip_ca:
            make_certificates(a.out, [h.strip() for h in a.hosts.split(",") if h.strip()], a.days)
        for i in range(a.merchants):
            make_merchant_key(a.out / "merchants", f"merchant_{i:02d}")
    except FedshopError as exc:
        print(f"fedshop: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}/ (ca.crt, server.crt/key{', merchants/' if a.merchants else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
