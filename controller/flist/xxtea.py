"""XXTEA as libflist (xxtea-c) uses it: zero padding plus the plaintext length as a last word.

The block cipher itself runs in C when the ``xxtea`` package (PyPI, ``padding=False`` mode: plain
XXTEA over the words) is installed, about 150 times faster; otherwise in pure Python (about 1 MB/s).
"""

from __future__ import annotations

import importlib
import struct
from types import ModuleType

_DELTA = 0x9E3779B9
_MASK = 0xFFFFFFFF


def _load_native() -> ModuleType | None:
    try:
        return importlib.import_module("xxtea")  # the PyPI package, not this module
    except ImportError:  # optional accelerator
        return None


_native = _load_native()


class XXTEAError(ValueError):
    """Ciphertext whose embedded length word is inconsistent (wrong key or corrupt data)."""


def _mx(z: int, y: int, total: int, p: int, e: int, k: tuple[int, ...]) -> int:
    return (((z >> 5) ^ (y << 2 & _MASK)) + ((y >> 3) ^ (z << 4 & _MASK))) ^ (
        (total ^ y) + (k[(p & 3) ^ e] ^ z)
    )


def _unpack(data: bytes, key: bytes) -> tuple[tuple[int, ...], list[int], int]:
    """Key words, data words and the index of the last data word."""
    words = list(struct.unpack(f"<{len(data) // 4}I", data))
    return struct.unpack("<4I", key), words, len(words) - 1


def _encrypt_words(data: bytes, key: bytes) -> bytes:
    if _native is not None:
        return bytes(_native.encrypt(data, key, padding=False))
    k, v, n = _unpack(data, key)
    z, total = v[n], 0
    for _ in range(6 + 52 // (n + 1)):
        total = (total + _DELTA) & _MASK
        e = total >> 2 & 3
        for p in range(n + 1):
            y = v[(p + 1) % (n + 1)]
            v[p] = z = (v[p] + _mx(z, y, total, p, e, k)) & _MASK
    return struct.pack(f"<{n + 1}I", *v)


def _decrypt_words(data: bytes, key: bytes) -> bytes:
    if _native is not None:
        return bytes(_native.decrypt(data, key, padding=False))
    k, v, n = _unpack(data, key)
    total = ((6 + 52 // (n + 1)) * _DELTA) & _MASK
    y = v[0]
    while total:
        e = total >> 2 & 3
        for p in range(n, -1, -1):
            z = v[p - 1] if p else v[n]
            v[p] = y = (v[p] - _mx(z, y, total, p, e, k)) & _MASK
        total = (total - _DELTA) & _MASK
    return struct.pack(f"<{n + 1}I", *v)


def _check_key(key: bytes) -> None:
    if len(key) != 16:
        raise XXTEAError(f"XXTEA key must be 16 bytes, got {len(key)}")


def encrypt(data: bytes, key: bytes) -> bytes:
    """Encrypt ``data``; the output is 4-byte aligned and carries the original length."""
    _check_key(key)
    return _encrypt_words(data + b"\0" * (-len(data) % 4) + struct.pack("<I", len(data)), key)


def decrypt(data: bytes, key: bytes) -> bytes:
    """Reverse :func:`encrypt`; raise :class:`XXTEAError` when the length word does not fit."""
    _check_key(key)
    if len(data) < 8 or len(data) % 4:
        raise XXTEAError(f"XXTEA ciphertext length {len(data)} is not a multiple of 4 >= 8")
    plain = _decrypt_words(data, key)
    size = struct.unpack_from("<I", plain, len(plain) - 4)[0]
    if not len(plain) - 7 <= size <= len(plain) - 4:
        raise XXTEAError(f"XXTEA length word {size} does not fit {len(plain)} bytes")
    return plain[:size]
