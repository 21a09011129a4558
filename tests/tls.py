"""A self-signed certificate for TLS tests on loopback, made with the ``openssl`` command."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import require_binary

OPENSSL_TIMEOUT_S = 60


def self_signed(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A certificate for ``127.0.0.1`` (its CN and subjectAltName), valid for a day, and its unencrypted RSA key:
    ``DIRECTORY/NAME-cert.pem`` and ``DIRECTORY/NAME-key.pem``. Needs ``openssl`` (``tests.support.require``)."""
    openssl = require_binary("openssl")
    cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=OPENSSL_TIMEOUT_S,
    )  # fmt: skip
    return cert, key
