"""The emulator's signatures: it checks the merchant's requests and signs its answers and notifications.

WECHATPAY2-SHA256-RSA2048, done with `cryptography` directly rather than through
the SDK, so a signing bug in the client cannot be mirrored here and go unnoticed.
"""

from __future__ import annotations

import functools
import re
import secrets
import string
from base64 import b64decode, b64encode
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from cancel_scanner.gateway.emulator.replies import Reply
from cancel_scanner.gateway.emulator.replies import error_reply as _error
from cancel_scanner.gateway.keys import KeyMaterial

AUTH_SCHEME = "WECHATPAY2-SHA256-RSA2048"
MAX_CLOCK_SKEW_SECONDS = 300

_AUTH_FIELD = re.compile(r'(\w+)="([^"]*)"')


class RequestHeaders(Protocol):
    """A request's headers, looked up by name: the server hands over its handler's http.client.HTTPMessage
    (case-insensitive, the first of repeated headers); a dict does for tests."""

    def get(self, name: str, /) -> str | None: ...


def nonce(length: int = 32) -> str:
    return "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(length))


@functools.lru_cache(maxsize=8)
def _load_private_key(pem: str) -> RSAPrivateKey:
    # Loading validates the RSA key (~50 ms); tests start an emulator per test with the same keys.
    key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    if not isinstance(key, RSAPrivateKey):
        raise TypeError(f"the platform private key must be an RSA key ({AUTH_SCHEME}), not {type(key).__name__}")
    return key


def _load_public_key(pem: str) -> RSAPublicKey:
    key = serialization.load_pem_public_key(pem.encode("ascii"))
    if not isinstance(key, RSAPublicKey):
        raise TypeError(f"the merchant public key must be an RSA key ({AUTH_SCHEME}), not {type(key).__name__}")
    return key


class Signer:
    """The gateway's side of the keys: the merchant's public key checks requests, the platform's private key signs.

    `wire_clock` is the clock request timestamps are checked against and signatures are stamped with.
    """

    def __init__(self, keys: KeyMaterial, wire_clock: Callable[[], float]) -> None:
        self._keys = keys
        self._wire_clock = wire_clock
        self._merchant_key = _load_public_key(keys.merchant_public_key_pem)
        self._platform_key = _load_private_key(keys.platform_private_key_pem)

    def authenticate(
        self, method: str, raw_path: str, headers: RequestHeaders, body: bytes, max_clock_skew: float
    ) -> Reply | None:
        """The refusal of a request whose Authorization does not hold, or None if it does."""
        scheme, _, params = (headers.get("Authorization") or "").partition(" ")
        if scheme != AUTH_SCHEME:
            return _error(401, "SIGN_ERROR", "missing Authorization or unsupported scheme")
        fields = dict(_AUTH_FIELD.findall(params))
        if not {"mchid", "nonce_str", "signature", "timestamp", "serial_no"} <= fields.keys():
            return _error(401, "SIGN_ERROR", "Authorization lacks a field")
        if fields["mchid"] != self._keys.mchid:
            return _error(404, "MCH_NOT_EXISTS", "merchant does not exist")
        if fields["serial_no"].upper() != self._keys.merchant_serial_no:
            return _error(401, "SIGN_ERROR", "unknown merchant certificate serial_no")
        try:
            timestamp = int(fields["timestamp"])
        except ValueError:
            return _error(401, "SIGN_ERROR", "timestamp is not a number")
        if abs(self._wire_clock() - timestamp) > max_clock_skew:
            return _error(401, "SIGN_ERROR", "timestamp is too far from the gateway's clock")
        try:
            message = f"{method}\n{raw_path}\n{fields['timestamp']}\n{fields['nonce_str']}\n{body.decode('utf-8')}\n"
            self._merchant_key.verify(
                b64decode(fields["signature"], validate=True),
                message.encode("utf-8"),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (InvalidSignature, ValueError):
            return _error(401, "SIGN_ERROR", "signature verification failed")
        return None

    def decrypt_field(self, ciphertext: Any) -> str | None:
        """A field the merchant encrypted with the platform public key (RSA-OAEP, SHA-1, as WeChat
        specifies), decrypted with the platform private key; None if it does not decrypt to UTF-8 text.
        The caller gets the plain text and must keep and log none of it."""
        if not isinstance(ciphertext, str):
            return None
        try:
            plain = self._platform_key.decrypt(
                b64decode(ciphertext, validate=True),
                padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
            )
            return plain.decode("utf-8")
        except ValueError:  # bad base64, a wrong key or padding, bad UTF-8 (UnicodeDecodeError is one)
            return None

    def signed_headers(self, body: Iterable[bytes], request_id: str, tamper: bool = False) -> dict[str, str]:
        """Headers signing `body` (an answer or a notification), given piece by piece (a huge body is never held whole)."""
        timestamp, wire_nonce = str(int(self._wire_clock())), nonce()
        digest = hashes.Hash(hashes.SHA256())
        digest.update(f"{timestamp}\n{wire_nonce}\n".encode("ascii"))
        for piece in body:
            digest.update(piece)
        # A well-formed signature over other bytes: only verification can tell.
        digest.update(b"\ntampered" if tamper else b"\n")
        signed = self._platform_key.sign(digest.finalize(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        signature = b64encode(signed).decode("ascii")
        return {
            "Content-Type": "application/json",
            "Request-ID": request_id,
            "Wechatpay-Timestamp": timestamp,
            "Wechatpay-Nonce": wire_nonce,
            "Wechatpay-Signature": signature,
            "Wechatpay-Serial": self._keys.platform_public_key_id,
            "Wechatpay-Signature-Type": AUTH_SCHEME,
        }
