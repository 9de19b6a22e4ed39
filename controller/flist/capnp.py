"""A small, bounds-checked reader for Cap'n Proto messages (standard unpacked serialization).

Only what the v1 flist schema needs: structs, struct lists, Text/Data, integers. Every pointer is
checked against its segment and reads are charged against a traversal budget, so garbage input
raises :class:`CapnpError` instead of looping or allocating without bound.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_MAX_SEGMENTS = 512


class CapnpError(ValueError):
    """The bytes are not a well-formed message for the requested read."""


class Message:
    """A parsed segment table plus the traversal budget shared by all reads of the message."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 8:
            raise CapnpError(f"message of {len(data)} bytes is too short")
        count = struct.unpack_from("<I", data)[0] + 1
        if count > _MAX_SEGMENTS:
            raise CapnpError(f"message claims {count} segments")
        header = 4 + 4 * count
        header += -header % 8
        if len(data) < header:
            raise CapnpError("truncated segment table")
        sizes = struct.unpack_from(f"<{count}I", data, 4)
        self.segments: list[memoryview] = []
        pos = header
        view = memoryview(data)
        for size in sizes:
            end = pos + 8 * size
            if end > len(data):
                raise CapnpError(f"segment of {size} words runs past the end of the message")
            self.segments.append(view[pos:end])
            pos = end
        total_words = (pos - header) // 8
        self._budget = 8 * total_words + 1024

    def charge(self, words: int) -> None:
        self._budget -= max(words, 1)
        if self._budget < 0:
            raise CapnpError("traversal limit exceeded (message references itself too often)")

    def word(self, seg: int, index: int) -> int:
        segment = self.segments[seg]
        if not 0 <= index < len(segment) // 8:
            raise CapnpError(f"pointer outside segment {seg}")
        return int.from_bytes(segment[8 * index : 8 * index + 8], "little")

    def check_range(self, seg: int, start: int, words: int) -> None:
        if start < 0 or start + words > len(self.segments[seg]) // 8:
            raise CapnpError(f"object of {words} words outside segment {seg}")

    def resolve(self, seg: int, index: int) -> tuple[int, int, int] | None:
        """Follow far pointers: returns (segment, pointer word value, content start) or None."""
        value = self.word(seg, index)
        if value == 0:
            return None
        if value & 3 != 2:
            return seg, value, index + 1 + _signed30(value >> 2)
        target_seg = value >> 32
        if target_seg >= len(self.segments):
            raise CapnpError(f"far pointer to missing segment {target_seg}")
        pad = (value >> 3) & 0x1FFFFFFF
        landing = self.word(target_seg, pad)
        if not value & 4:
            if landing & 3 == 2:
                raise CapnpError("far pointer lands on another far pointer")
            return target_seg, landing, pad + 1 + _signed30(landing >> 2)
        if landing & 7 != 2:
            raise CapnpError("double-far landing pad is not a far pointer")
        content_seg = landing >> 32
        if content_seg >= len(self.segments):
            raise CapnpError(f"double-far pointer to missing segment {content_seg}")
        return content_seg, self.word(target_seg, pad + 1), (landing >> 3) & 0x1FFFFFFF

    def root(self) -> Struct:
        found = self.resolve(0, 0)
        if found is None:
            raise CapnpError("message has no root")
        return self.struct_at(*found)

    def struct_at(self, seg: int, value: int, start: int) -> Struct:
        if value & 3 != 0:
            raise CapnpError("expected a struct pointer")
        data_words = (value >> 32) & 0xFFFF
        ptr_count = value >> 48
        self.check_range(seg, start, data_words + ptr_count)
        self.charge(data_words + ptr_count)
        return Struct(self, seg, start, data_words, ptr_count)


def _signed30(value: int) -> int:
    value &= 0x3FFFFFFF
    return value - (1 << 30) if value & (1 << 29) else value


@dataclass(frozen=True)
class Struct:
    """A struct inside a message; field accessors take offsets in units of the field's size."""

    msg: Message
    seg: int
    start: int
    data_words: int
    ptr_count: int

    def _data(self, byte_offset: int, size: int) -> int:
        if byte_offset + size > 8 * self.data_words:
            return 0  # fields beyond an older/smaller struct read as their default
        segment = self.msg.segments[self.seg]
        pos = 8 * self.start + byte_offset
        return int.from_bytes(segment[pos : pos + size], "little")

    def uint16(self, offset: int) -> int:
        return self._data(2 * offset, 2)

    def uint32(self, offset: int) -> int:
        return self._data(4 * offset, 4)

    def uint64(self, offset: int) -> int:
        return self._data(8 * offset, 8)

    def int64(self, offset: int, default: int = 0) -> int:
        raw = self._data(8 * offset, 8) ^ (default & 0xFFFFFFFFFFFFFFFF)
        return raw - (1 << 64) if raw & (1 << 63) else raw

    def _pointer(self, index: int) -> tuple[int, int, int] | None:
        if index >= self.ptr_count:
            return None
        return self.msg.resolve(self.seg, self.start + self.data_words + index)

    def struct(self, index: int) -> Struct | None:
        found = self._pointer(index)
        return None if found is None else self.msg.struct_at(*found)

    def data(self, index: int) -> bytes | None:
        found = self._pointer(index)
        if found is None:
            return None
        seg, value, start = found
        if value & 3 != 1 or (value >> 32) & 7 != 2:
            raise CapnpError("expected a byte list pointer")
        count = value >> 35
        words = (count + 7) // 8
        self.msg.check_range(seg, start, words)
        self.msg.charge(words)
        return bytes(self.msg.segments[seg][8 * start : 8 * start + count])

    def text(self, index: int) -> str | None:
        raw = self.data(index)
        if raw is None:
            return None
        if not raw.endswith(b"\0"):
            raise CapnpError("text is not NUL-terminated")
        return raw[:-1].decode("utf-8", "replace")

    def struct_list(self, index: int) -> list[Struct]:
        found = self._pointer(index)
        if found is None:
            return []
        seg, value, start = found
        if value & 3 != 1 or (value >> 32) & 7 != 7:
            raise CapnpError("expected a composite (struct) list pointer")
        words = value >> 35
        self.msg.check_range(seg, start, words + 1)
        tag = self.msg.word(seg, start)
        if tag & 3 != 0:
            raise CapnpError("struct list tag is not a struct pointer")
        count = (tag >> 2) & 0x3FFFFFFF
        data_words = (tag >> 32) & 0xFFFF
        ptr_count = tag >> 48
        step = data_words + ptr_count
        if count * step > words:
            raise CapnpError(f"struct list of {count} elements overruns its {words} words")
        items = []
        for i in range(count):
            self.msg.charge(step)
            items.append(Struct(self.msg, seg, start + 1 + i * step, data_words, ptr_count))
        return items
