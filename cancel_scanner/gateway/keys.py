"""Throw-away key material for the emulator, the sandbox and tests.

Shaped like what a merchant gets from WeChat Pay: a merchant RSA key pair and
certificate serial, the platform ("WeChat Pay public key") pair and its id, an
APIv3 key, a mchid and an appid. Never used for live traffic.
"""

from __future__ import annotations

import os
import secrets
import string
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SANDBOX_MCHID = "1900000001"
SANDBOX_APPID = "wx0000000000000000"
RSA_KEY_BITS = 2048
APIV3_KEY_CHARS = 32  # AES-256-GCM: the SDK uses the key's UTF-8 bytes as is
PUBLIC_KEY_ID_PREFIX = "PUB_KEY_ID_"
SECRET_FILE_MODE = 0o600
KEY_DIR_MODE = 0o700


@dataclass(frozen=True)
class KeyPaths:
    """Where generate_key_material wrote each piece (all files 0600)."""

    directory: Path
    merchant_private_key: Path
    merchant_public_key: Path
    platform_private_key: Path
    platform_public_key: Path
    apiv3_key: Path


@dataclass(frozen=True)
class KeyMaterial:
    # repr=False on every secret so a KeyMaterial in a log line or traceback leaks nothing.
    mchid: str
    appid: str
    merchant_serial_no: str
    merchant_public_key_pem: str
    platform_public_key_pem: str
    platform_public_key_id: str
    merchant_private_key_pem: str = field(repr=False)
    platform_private_key_pem: str = field(repr=False)
    apiv3_key: str = field(repr=False)
    paths: KeyPaths | None = None


def _new_rsa_pair() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    # PKCS#8 "BEGIN PRIVATE KEY", the format of WeChat's apiclient_key.pem and what the SDK expects.
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )
    return private_pem, public_pem


def _write_secret(path: Path, text: str) -> None:
    # Create with 0600 from the start: a chmod after writing leaves a window where the file is readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SECRET_FILE_MODE)
    try:
        os.fchmod(fd, SECRET_FILE_MODE)  # the file may have existed with looser bits
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def write_key_material(material: KeyMaterial, directory: Path) -> KeyPaths:
    directory.mkdir(mode=KEY_DIR_MODE, parents=True, exist_ok=True)
    paths = KeyPaths(
        directory=directory,
        merchant_private_key=directory / "apiclient_key.pem",
        merchant_public_key=directory / "apiclient_pub.pem",
        platform_private_key=directory / "platform_key.pem",
        platform_public_key=directory / "pub_key.pem",
        apiv3_key=directory / "apiv3_key",
    )
    _write_secret(paths.merchant_private_key, material.merchant_private_key_pem)
    _write_secret(paths.merchant_public_key, material.merchant_public_key_pem)
    _write_secret(paths.platform_private_key, material.platform_private_key_pem)
    _write_secret(paths.platform_public_key, material.platform_public_key_pem)
    _write_secret(paths.apiv3_key, material.apiv3_key)
    return paths


def generate_key_material(directory: Path | None = None) -> KeyMaterial:
    """New random keys; with a directory, also write them there and return the paths."""
    merchant_private, merchant_public = _new_rsa_pair()
    platform_private, platform_public = _new_rsa_pair()
    alphabet = string.ascii_letters + string.digits
    material = KeyMaterial(
        mchid=SANDBOX_MCHID,
        appid=SANDBOX_APPID,
        merchant_serial_no=secrets.token_hex(20).upper(),
        merchant_public_key_pem=merchant_public,
        platform_public_key_pem=platform_public,
        platform_public_key_id=PUBLIC_KEY_ID_PREFIX + "".join(secrets.choice(string.digits) for _ in range(32)),
        merchant_private_key_pem=merchant_private,
        platform_private_key_pem=platform_private,
        apiv3_key="".join(secrets.choice(alphabet) for _ in range(APIV3_KEY_CHARS)),
    )
    if directory is None:
        return material
    paths = write_key_material(material, Path(directory))
    return replace(material, paths=paths)
