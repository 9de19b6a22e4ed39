"""XXTEA as libflist (xxtea-c) uses it: zero padding plus the plaintext length as a last word."""

from __future__ import annotations

import struct

_DELTA = 0x9E3779B9
_MASK = 0xFFFFFFFF


class XXTEAError(ValueError):
    """Ciphertext whose embedded length word is inconsistent (wrong key or corrupt data)."""


def _words(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 4}I", data))


def _key_words(key: bytes) -> list[int]:
    if len(key) != 16:
        raise XXTEAError(f"XXTEA key must be 16 bytes, got {len(key)}")
    return _words(key)


def _mx(z: int, y: int, total: int, p: int, e: int, k: list[int]) -> int:
    return (((z >> 5) ^ (y << 2 & _MASK)) + ((y >> 3) ^ (z << 4 & _MASK))) ^ (
        (total ^ y) + (k[(p & 3) ^ e] ^ z)
    )


def encrypt(data: bytes, key: bytes) -> bytes:
    """Encrypt ``data``; the output is 4-byte aligned and carries the original length."""
    k = _key_words(key)
    v = [*_words(data + b"\0" * (-len(data) % 4)), len(data)]
    n = len(v) - 1
    z, total = v[n], 0
    for _ in range(6 + 52 // (n + 1)):
        total = (total + _DELTA) & _MASK
        e = total >> 2 & 3
        for p in range(n + 1):
            y = v[(p + 1) % (n + 1)]
            v[p] = z = (v[p] + _mx(z, y, total, p, e, k)) & _MASK
    return struct.pack(f"<{n + 1}I", *v)


def decrypt(data: bytes, key: bytes) -> bytes:
    """Reverse :func:`encrypt`; raise :class:`XXTEAError` when the length word does not fit."""
    k = _key_words(key)
    if len(data) < 8 or len(data) % 4:
        raise XXTEAError(f"XXTEA ciphertext length {len(data)} is not a multiple of 4 >= 8")
    v = _words(data)
    n = len(v) - 1
    rounds = 6 + 52 // (n + 1)
    total = (rounds * _DELTA) & _MASK
    y = v[0]
    while total:
        e = total >> 2 & 3
        for p in range(n, -1, -1):
            z = v[p - 1] if p else v[n]
            v[p] = y = (v[p] - _mx(z, y, total, p, e, k)) & _MASK
        total = (total - _DELTA) & _MASK
    size = v[n]
    nbytes = 4 * (n + 1)
    if not nbytes - 7 <= size <= nbytes - 4:
        raise XXTEAError(f"XXTEA length word {size} does not fit {nbytes} bytes")
    return struct.pack(f"<{n}I", *v[:n])[:size]
