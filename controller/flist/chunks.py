"""Chunk codecs: plaintext <-> stored block, for both flist generations.

v2 (rfs ``.fl``): key = blake2b-256(P), E = AES-256-GCM(snappy_raw(P), key, nonce=key[:12]),
id = blake2b-256(E). v1 (``.flist``): key = blake2b-128(P), E = XXTEA(snappy_raw(P), key),
id = blake2b-128(E). The key length (32 or 16 bytes) tells the codecs apart.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import snappy
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from controller.flist import xxtea
from controller.flist.errors import BlockCorruptError

CHUNK_SIZE = 512 * 1024
V2_HASH_SIZE = 32
V1_HASH_SIZE = 16
# Stored blocks are compressed chunks plus a little framing; anything much larger is not a block.
MAX_STORED_BLOCK = CHUNK_SIZE + CHUNK_SIZE // 4 + 1024


@dataclass(frozen=True)
class BlockRef:
    """One chunk of a file: where it is stored (``id``) and how to open it (``key``)."""

    id: bytes
    key: bytes


def _snappy_length(data: bytes) -> int:
    """Uncompressed length from the raw-snappy varint header (checked before decompressing)."""
    result = 0
    for i, byte in enumerate(data[:5]):
        result |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return result
    raise ValueError("bad snappy length header")


def _unsnappy(data: bytes) -> bytes:
    if _snappy_length(data) > CHUNK_SIZE:
        raise ValueError("snappy block claims more than one chunk")
    return bytes(snappy.decompress(data))


def encode_v2(plain: bytes) -> tuple[BlockRef, bytes]:
    """Encode one plaintext chunk the rfs way; returns the reference and the stored bytes."""
    key = hashlib.blake2b(plain, digest_size=V2_HASH_SIZE).digest()
    stored = AESGCM(key).encrypt(key[:12], snappy.compress(plain), None)
    return BlockRef(hashlib.blake2b(stored, digest_size=V2_HASH_SIZE).digest(), key), stored


def encode_v1(plain: bytes) -> tuple[BlockRef, bytes]:
    """Encode one plaintext chunk the libflist way (used to build v1 flists in tests)."""
    key = hashlib.blake2b(plain, digest_size=V1_HASH_SIZE).digest()
    stored = xxtea.encrypt(snappy.compress(plain), key)
    return BlockRef(hashlib.blake2b(stored, digest_size=V1_HASH_SIZE).digest(), key), stored


def key_matches(plain: bytes, key: bytes) -> bool:
    """True when ``plain`` hashes to ``key`` (the per-chunk integrity check)."""
    return hashlib.blake2b(plain, digest_size=len(key)).digest() == key


def decode(stored: bytes, ref: BlockRef) -> bytes:
    """Decrypt, decompress and verify one stored block; :class:`BlockCorruptError` if it fails."""
    what = f"block {ref.id.hex()}"
    if len(stored) > MAX_STORED_BLOCK:
        raise BlockCorruptError(f"{what}: {len(stored)} bytes is larger than any chunk")
    try:
        if len(ref.key) == V2_HASH_SIZE:
            compressed = AESGCM(ref.key).decrypt(ref.key[:12], stored, None)
        elif len(ref.key) == V1_HASH_SIZE:
            compressed = xxtea.decrypt(stored, ref.key)
        else:
            raise BlockCorruptError(f"{what}: key of {len(ref.key)} bytes")
        plain = _unsnappy(compressed)
    except InvalidTag:
        raise BlockCorruptError(f"{what}: AES-GCM authentication failed") from None
    except BlockCorruptError:
        raise
    except Exception as exc:  # snappy and xxtea raise assorted types on garbage
        raise BlockCorruptError(f"{what}: cannot decode: {exc}") from None
    if not key_matches(plain, ref.key):
        raise BlockCorruptError(f"{what}: content does not match its key")
    return plain
