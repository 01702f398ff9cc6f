"""Spark-written Parquet is byte-identical across JVMs once its footer is made canonical.

parquet-mr lists each column chunk's encodings in a JVM-dependent order. Rather than hope that two
JVMs disagree, the files here are given non-canonical orders on purpose: the encodings list of every
column chunk is located in the footer (``ColumnMetaData`` field 2, found by its exact compact-Thrift
bytes, with pyarrow's parsed metadata as the oracle of what the list holds) and rewritten in another
order. Nothing here uses ``pipelines.parquet_footer`` to build its inputs or its expected outputs.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from downpour.pipelines.parquet_footer import canonicalize, canonicalize_file

# parquet.thrift: enum Encoding
ENCODING = {"PLAIN": 0, "PLAIN_DICTIONARY": 2, "RLE": 3, "BIT_PACKED": 4, "DELTA_BINARY_PACKED": 5,
            "DELTA_LENGTH_BYTE_ARRAY": 6, "DELTA_BYTE_ARRAY": 7, "RLE_DICTIONARY": 8, "BYTE_STREAM_SPLIT": 9}
FRAME = ('spark.range(3000).selectExpr("id", "cast(id % 7 as string) as s", "id * 1.5 as d", '
         '"if(id % 3 = 0, null, id) as n")')


def _encodings(data: bytes) -> list[tuple[str, ...]]:
    """Every column chunk's encodings list, in file order, as pyarrow parses it."""
    md = pq.ParquetFile(io.BytesIO(data)).metadata
    return [md.row_group(g).column(c).encodings for g in range(md.num_row_groups) for c in range(md.num_columns)]


def _list_bytes(codes: list[int]) -> bytes:
    """``ColumnMetaData.encodings`` in compact Thrift: field header (id 1 -> 2, type list), list header
    (size, element type i32), zigzag varints (every Encoding value fits in one byte)."""
    assert len(codes) < 15 and all(0 <= c < 64 for c in codes)
    return bytes([0x19, len(codes) << 4 | 5, *(c << 1 for c in codes)])


def _reorder(data: bytes, order) -> bytes:
    """``data`` with every column chunk's encodings list rewritten as ``order(list of Encoding values)``."""
    start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    footer = bytearray(data[start:-8])
    pos = 0
    for names in _encodings(data):
        codes = [ENCODING[n] for n in names]
        old, new = _list_bytes(codes), _list_bytes(list(order(codes)))
        # chunks in file order, each list found after the previous one (several may hold the same bytes)
        at = footer.find(old, pos)
        assert at >= 0, f"encodings list {names} not found in the footer"
        footer[at:at + len(old)] = new
        pos = at + len(new)
    out = data[:start] + bytes(footer) + data[-8:]
    assert len(out) == len(data)
    return out


def _descending(codes: list[int]) -> list[int]:
    return sorted(codes, reverse=True)


def _rotated(codes: list[int]) -> list[int]:
    """The canonical order rotated by one: another non-canonical order where a list has 2+ entries."""
    s = sorted(codes)
    return s[1:] + s[:1]


def _spark_file(spark, tmp_path: Path) -> bytes:
    eval(FRAME, {"spark": spark}).coalesce(1).write.parquet(str(tmp_path / "spark"))
    (f,) = (tmp_path / "spark").glob("*.parquet")
    return f.read_bytes()


def _pyarrow_file() -> bytes:
    n = 3000
    table = pa.table({"id": pa.array(range(n), pa.int64()), "s": pa.array([str(i % 7) for i in range(n)]),
                      "d": pa.array([i * 1.5 for i in range(n)]),
                      "n": pa.array([None if i % 3 == 0 else i for i in range(n)], pa.int64())})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=1000)  # 3 row groups: several lists per column
    return buf.getvalue()


@pytest.mark.parametrize("writer", ["spark", "pyarrow"])
def test_encodings_order_is_made_canonical_and_byte_identical(writer, spark, tmp_path):
    base = _spark_file(spark, tmp_path) if writer == "spark" else _pyarrow_file()
    lists = _encodings(base)
    assert any(len(set(e)) > 1 for e in lists)  # something to reorder: the test is not vacuous

    a, b = _reorder(base, _descending), _reorder(base, _rotated)
    expected = _reorder(base, sorted)
    assert a != b and a != expected and b != expected  # three different files...
    by_value = [sorted(e, key=ENCODING.get) for e in lists]
    assert _encodings(a) == [tuple(e[::-1]) for e in by_value]  # ...with the lists where pyarrow reads them
    assert _encodings(b) == [tuple(e[1:] + e[:1]) for e in by_value]
    assert _encodings(expected) == [tuple(e) for e in by_value]
    assert pq.read_table(io.BytesIO(a)).equals(pq.read_table(io.BytesIO(base)))  # still valid, same data

    ca, cb = canonicalize(a), canonicalize(b)
    assert ca == cb == expected  # byte-identical whatever the order the writer chose
    assert canonicalize(base) == expected
    assert canonicalize(expected) is expected  # idempotent: nothing to do the second time
    assert pq.read_table(io.BytesIO(ca)).equals(pq.read_table(io.BytesIO(base)))

    # in place, as the shard writer calls it: the stale Hadoop checksum beside the file goes
    path = tmp_path / "part-00000.parquet"
    crc = tmp_path / ".part-00000.parquet.crc"
    path.write_bytes(a)
    crc.write_bytes(b"stale")
    assert canonicalize_file(str(path)) == expected
    assert path.read_bytes() == expected and not crc.exists()
    crc.write_bytes(b"kept")
    assert canonicalize_file(str(path)) == expected  # already canonical: not rewritten
    assert crc.exists()
    os.remove(crc)


def test_not_parquet_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a Parquet file"):
        canonicalize(b"PAR1 this is not parquet")
