"""Password hashes for console users: scrypt (stdlib) in a self-describing string.

``scrypt$<n>$<r>$<p>$<salt>$<hash>`` (salt and hash in unpadded URL-safe base64) carries its own
cost parameters, so raising the cost later leaves hashes already issued valid. Only the hash is
ever kept, by reference (a file or an environment variable), never the password or the YAML.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

__all__ = ["hash_password", "verify_password", "well_formed"]

#: scrypt cost: 2**15 x 8 x 1 takes about 50 ms and 32 MiB per login on a small server
N, R, P = 2**15, 8, 1
_MAXMEM = 64 * 1024 * 1024
_SALT_BYTES, _HASH_BYTES = 16, 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, n: int = N, r: int = R, p: int = P) -> str:
    """A new hash line for ``password`` with a fresh random salt."""
    if not password:
        raise ValueError("an empty password cannot be used")
    salt = os.urandom(_SALT_BYTES)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=_HASH_BYTES)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def _parse(line: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = line.strip().split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return None
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        return None
    # refuse parameters that would make one login cost the server more than it can give
    if n < 2 or n & (n - 1) or n > 2**20 or not 1 <= r <= 32 or not 1 <= p <= 16 or 128 * n * r * p > _MAXMEM:
        return None
    if len(salt) < 8 or len(digest) < 16:
        return None
    return n, r, p, salt, digest


def well_formed(line: str) -> bool:
    """Whether ``line`` is a hash this module can check (what ``syncbridge check`` would want to know)."""
    return _parse(line) is not None


def verify_password(password: str, line: str) -> bool:
    """True when ``password`` matches the hash line; a malformed line matches nothing."""
    parsed = _parse(line)
    if parsed is None or not password:
        return False
    n, r, p, salt, digest = parsed
    found = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=len(digest))
    return hmac.compare_digest(found, digest)
