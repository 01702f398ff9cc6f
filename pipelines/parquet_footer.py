"""Make Spark-written Parquet byte-identical across JVMs: sort each column chunk's encodings list.

parquet-mr fills ``ColumnMetaData.encodings`` from a ``HashSet<Encoding>``; an enum's hash is its
identity hash, so the order of that list (and with it the file's SHA-256) changes from one Java
process to the next although every data page and every other footer field is identical. Sorting the
list in place makes the bytes a function of the data alone. The list holds small Thrift-compact
varints, so reordering it never changes the footer's length or any offset in the file.

Only the footer is parsed, with a minimal Thrift compact-protocol walker (no generated classes):
``FileMetaData.row_groups(4) -> RowGroup.columns(1) -> ColumnChunk.meta_data(3) ->
ColumnMetaData.encodings(2)``.
"""

from __future__ import annotations

import os

_MAGIC = b"PAR1"
_ENCODINGS_PATH = (4, 1, 3, 2)
# Thrift compact types
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)


class _Walker:
    def __init__(self, buf: bytearray, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end
        self.changed = False

    def _byte(self) -> int:
        if self.pos >= self.end:
            raise ValueError("truncated Parquet footer")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def _varint(self) -> int:
        shift = result = 0
        while True:
            b = self._byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    def struct(self, path: tuple[int, ...]) -> None:
        field = 0
        while True:
            header = self._byte()
            if header == 0:  # STOP
                return
            kind, delta = header & 0x0F, header >> 4
            if delta:
                field += delta
            else:
                z = self._varint()
                field = (z >> 1) ^ -(z & 1)
            self.value(kind, (*path, field))

    def value(self, kind: int, path: tuple[int, ...]) -> None:
        if kind in (_TRUE, _FALSE):
            return
        if kind == _BYTE:
            self.pos += 1
        elif kind in (_I16, _I32, _I64):
            self._varint()
        elif kind == _DOUBLE:
            self.pos += 8
        elif kind == _BINARY:
            n = self._varint()
            self.pos += n
        elif kind in (_LIST, _SET):
            self.list(path)
        elif kind == _MAP:
            n = self._varint()
            if n:
                types = self._byte()
                for _ in range(n):
                    self.value(types >> 4, path)
                    self.value(types & 0x0F, path)
        elif kind == _STRUCT:
            self.struct(path)
        else:
            raise ValueError(f"unknown Thrift compact type {kind} in Parquet footer")
        if self.pos > self.end:
            raise ValueError("truncated Parquet footer")

    def list(self, path: tuple[int, ...]) -> None:
        header = self._byte()
        size, kind = header >> 4, header & 0x0F
        if size == 15:
            size = self._varint()
        if path == _ENCODINGS_PATH and kind == _I32:
            items = []
            for _ in range(size):
                start = self.pos
                z = self._varint()
                items.append(((z >> 1) ^ -(z & 1), bytes(self.buf[start:self.pos])))
            first = self.pos - sum(len(raw) for _, raw in items)
            canonical = b"".join(raw for _, raw in sorted(items))
            if canonical != bytes(self.buf[first:self.pos]):
                self.buf[first:self.pos] = canonical
                self.changed = True
            return
        for _ in range(size):
            self.value(kind if kind not in (_TRUE, _FALSE) else _BYTE, path)


def footer_span(data: bytes | bytearray) -> tuple[int, int]:
    """(start, end) of the Thrift footer inside a whole Parquet file."""
    if len(data) < 12 or data[:4] != _MAGIC or data[-4:] != _MAGIC:
        raise ValueError("not a Parquet file (no PAR1 magic at both ends)")
    length = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - length
    if start < 4:
        raise ValueError("Parquet footer length is larger than the file")
    return start, len(data) - 8


def canonical_footer(footer: bytes) -> bytes:
    """The serialized ``FileMetaData`` with every column chunk's encodings list sorted."""
    buf = bytearray(footer)
    walker = _Walker(buf, 0, len(buf))
    walker.struct(())
    return bytes(buf) if walker.changed else footer


def canonicalize(data: bytes) -> bytes:
    """A whole Parquet file's bytes with a canonical footer (same length; data pages untouched)."""
    start, end = footer_span(data)
    footer = canonical_footer(data[start:end])
    return data if footer == data[start:end] else data[:start] + footer + data[end:]


def canonicalize_file(path: str) -> bytes:
    """Rewrite a local Parquet file's footer in place if needed; returns the file's final bytes.

    Hadoop's local file system keeps a ``.<name>.crc`` beside each file it wrote and checks reads
    against it; a rewritten file's stale one is removed (Hadoop reads a file without one unchecked).
    """
    with open(path, "rb") as fh:
        data = fh.read()
    start, end = footer_span(data)
    footer = canonical_footer(data[start:end])
    if footer == data[start:end]:
        return data
    with open(path, "r+b") as fh:
        fh.seek(start)
        fh.write(footer)
        fh.flush()
    crc = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.crc")
    if os.path.exists(crc):
        os.remove(crc)
    return data[:start] + footer + data[end:]
