"""Ingest: read raw CSV / JSON / Parquet from any Hadoop URL, enforce the declared columns, try-cast.

Every CSV and JSON value is read as text first, so a value that does not parse keeps its raw text for
the quarantine. The header (CSV) or the key set (JSON, Parquet) is checked against ``schema:`` before
any row is trusted: a missing declared column, or an undeclared one without
``input.allow_extra_columns``, is a ``DataContractError`` naming the column and the file. Raw names are
mapped to safe internal names right after reading. Casting uses ``try_cast`` (null on failure, under
ANSI mode too); a value that was not null before the cast and is null after it is a cast failure.

The PII policy is applied here, before anything is cached: ``pii.hash`` columns are replaced by a
salted SHA-256 of their normalised text (in the typed *and* the raw copy), ``pii.drop`` columns are
gone from both, and the text of a malformed line is kept only when no PII policy is configured.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from downpour.config import Config
from downpour.errors import DataContractError
from downpour.logs import LOG
from pipelines.columns import internal_names
from pipelines.publish import FileInfo, HadoopFS

# Internal helper columns (safe names never start with "_", so these cannot clash).
CORRUPT = "_dp_corrupt"
SOURCE = "_dp_source_file"
REASON = "_dp_reason"
STAGE = "_dp_stage"
RAW = "_dp_raw"
ROW_HASH = "_dp_row_hash"
EXTRA = "_dp_extra"
BLANK_PREFIX = "_dp_blank__"

# Columns the pipeline derives; a raw column whose safe name collides gets a numeric suffix instead.
DERIVED = ("row_id", "label", "weight", "split")
WHITESPACE = " \t\r\n\u00a0"


# ---- names and inputs -------------------------------------------------------------------------------
def column_names(cfg: Config) -> dict[str, str]:
    """Raw declared name -> safe internal name, never colliding with the derived columns."""
    reserved = {f"\x00{d}": d for d in DERIVED}
    names = internal_names([*reserved.values(), *cfg.schema_])
    return {raw: names[raw] for raw in cfg.schema_}


def list_input_files(spark: SparkSession, url: str) -> list[FileInfo]:
    """The input files (through Hadoop FileSystem, so any URL works); raises if there are none."""
    fs = HadoopFS(spark)
    try:
        files = fs.list_files(fs.qualify(url))
    except Exception as exc:  # noqa: BLE001 - a bad URL or missing credentials: say which input
        raise DataContractError(f"input.path {url}: cannot list input files ({_first_line(exc)})") from None
    if not files:
        raise DataContractError(f"input.path {url}: no input files found")
    if all(f.size == 0 for f in files):
        raise DataContractError(f"input.path {url}: every input file is empty ({len(files)} files)")
    return files


def input_fingerprint(files: list[FileInfo]) -> str:
    """SHA-256 of (path, size, mtime) of every input file: changes when any input file changes."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        h.update(json.dumps([f.path, f.size, f.mtime]).encode())
        h.update(b"\n")
    return h.hexdigest()


# ---- reading ----------------------------------------------------------------------------------------
def read_raw(spark: SparkSession, cfg: Config, files: list[FileInfo]) -> DataFrame:
    """Declared columns under safe names (text for CSV/JSON, native types for Parquet), plus the
    malformed-record text, the source file and a marker that keeps extra CSV columns parsed."""
    names = column_names(cfg)
    paths = [f.path for f in files]
    first = next(f.path for f in files if f.size > 0)
    opts = {k: _opt(v) for k, v in cfg.input.options.items()}
    for k in ("mode", "columnNameOfCorruptRecord", "inferSchema", "enforceSchema", "primitivesAsString"):
        if k in opts:
            LOG.warning("input.options.%s is managed by downpour (bad rows are quarantined); ignored", k)
            opts.pop(k)
    fmt = cfg.input.format
    try:
        if fmt == "csv":
            df, columns = _read_csv(spark, cfg, paths, first, opts)
        elif fmt == "json":
            df, columns = _read_json(spark, paths, opts)
        else:
            df, columns = _read_parquet(spark, paths, opts)
    except DataContractError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable input is a data problem, not a crash
        raise DataContractError(f"input {cfg.input.path}: cannot read as {fmt} ({_first_line(exc)})") from None
    if fmt != "csv":
        _check_columns(cfg, columns, first if len(paths) == 1 else f"{first} (and {len(paths) - 1} more)",
                       df=df)
    declared = list(cfg.schema_)
    extras = [c for c in columns if c not in cfg.schema_]
    cols: list[Column] = []
    for raw in declared:
        c = F.col(_q(raw))
        dtype = df.schema[raw].dataType
        if fmt == "json" and isinstance(dtype, T.StructType | T.ArrayType | T.MapType):
            c = F.to_json(c)  # nested JSON value under a scalar declared column: keep its text
        elif isinstance(dtype, T.StructType | T.ArrayType | T.MapType | T.BinaryType):
            raise DataContractError(
                f"column {raw!r} in {first}: has type {dtype.simpleString()}, declared {cfg.schema_[raw]}"
            )
        cols.append(c.alias(names[raw]))
    corrupt = F.col(CORRUPT) if CORRUPT in df.columns else F.lit(None).cast("string")
    # Referencing the extra CSV columns keeps Spark from pruning them, which would hide wrong field counts.
    extra = F.coalesce(*[F.col(_q(c)) for c in extras]).isNull() if extras and fmt == "csv" else F.lit(None)
    return df.select(*cols, corrupt.alias(CORRUPT), F.input_file_name().alias(SOURCE),
                     extra.cast("boolean").alias(EXTRA))


def _read_csv(spark: SparkSession, cfg: Config, paths: list[str], first: str,
              opts: dict[str, str]) -> tuple[DataFrame, list[str]]:
    header = opts.setdefault("header", "true").lower() == "true"
    if header:
        # The header of one file decides the column order; Spark checks every other file against it
        # (enforceSchema=false) and fails naming the file, which contract_errors() turns into exit 3.
        columns = spark.read.options(**opts).option("inferSchema", "false").csv(first).columns
        if not columns:
            raise DataContractError(f"input file {first}: no header line")
        _check_columns(cfg, columns, first)
    else:
        columns = list(cfg.schema_)
    schema = T.StructType([T.StructField(c, T.StringType()) for c in columns]
                          + [T.StructField(CORRUPT, T.StringType())])
    df = (spark.read.options(**opts).option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", CORRUPT)
          .option("enforceSchema", "false").schema(schema).csv(paths))
    return df, columns


def _read_json(spark: SparkSession, paths: list[str], opts: dict[str, str]) -> tuple[DataFrame, list[str]]:
    df = (spark.read.options(**opts).option("primitivesAsString", "true").option("mode", "PERMISSIVE")
          .option("columnNameOfCorruptRecord", CORRUPT).json(paths))
    return df, [c for c in df.columns if c != CORRUPT]


def _read_parquet(spark: SparkSession, paths: list[str], opts: dict[str, str]) -> tuple[DataFrame, list[str]]:
    opts.setdefault("mergeSchema", "true")  # the union of all files' columns, so an extra one anywhere shows
    df = spark.read.options(**opts).parquet(*paths)
    return df, list(df.columns)


def _check_columns(cfg: Config, columns: list[str], where: str, df: DataFrame | None = None) -> None:
    """Missing declared columns, and undeclared ones unless allowed, break the data contract."""
    if not columns:
        raise DataContractError(f"input {where}: no rows (no columns could be read)")
    missing = [c for c in cfg.schema_ if c not in columns]
    if missing:
        raise DataContractError(
            f"input file {where}: declared column {missing[0]!r} is missing"
            + (f" (also missing: {missing[1:]})" if missing[1:] else "")
            + f"; the file has columns {columns}"
        )
    extra = [c for c in columns if c not in cfg.schema_]
    if extra and not cfg.input.allow_extra_columns:
        if df is not None:  # JSON / Parquet: find a file that really holds the column
            hit = df.where(F.col(_q(extra[0])).isNotNull()).select(F.input_file_name()).limit(1).collect()
            where = hit[0][0] if hit else where
        raise DataContractError(
            f"input file {where}: column {extra[0]!r} is not declared in schema"
            + (f" (also undeclared: {extra[1:]})" if extra[1:] else "")
            + " (declare it, or set input.allow_extra_columns: true)"
        )


_HEADER_MISMATCH = re.compile(r"CSV header does not conform to the schema\.\s*Header: (.*)\n\s*Schema: (.*)\n")
_HEADER_LENGTH = re.compile(r"Number of column in CSV header is not equal to number of fields in the schema")
_CSV_FILE = re.compile(r"CSV file: (\S+)")


@contextlib.contextmanager
def contract_errors(cfg: Config) -> Iterator[None]:
    """Turn Spark's lazy per-file header check failure into a DataContractError naming column and file."""
    try:
        yield
    except Exception as exc:
        text = str(exc)
        if "CSV header does not conform" not in text and not _HEADER_LENGTH.search(text):
            raise
        file = _CSV_FILE.search(text)
        where = file.group(1) if file else cfg.input.path
        m = _HEADER_MISMATCH.search(text)
        if m:
            header = [c.strip() for c in m.group(1).split(",")]
            expected = [c.strip() for c in m.group(2).split(",")]
            missing = [c for c in expected if c not in header]
            extra = [c for c in header if c not in expected]
            detail = (f"declared column {missing[0]!r} is missing" if missing else
                      f"column {extra[0]!r} is not declared in schema" if extra else
                      "its header lists the columns in another order than the first file")
            raise DataContractError(f"input file {where}: {detail}; the file has columns {header}") from None
        raise DataContractError(
            f"input file {where}: its header has another number of columns than the first file"
        ) from None


# ---- parsing ----------------------------------------------------------------------------------------
_NORM = "_dp_n__"


def parse_columns(raw: DataFrame, cfg: Config, names: dict[str, str], salt: str | None) -> DataFrame:
    """Normalise text, apply the PII policy, try-cast to the declared types and tag failures.

    Returns the declared columns (typed; ``pii.hash`` ones as hex digests; ``pii.drop`` ones gone)
    plus ``_dp_raw`` (the raw text of every kept column, PII-sanitised), ``_dp_reason`` /
    ``_dp_stage`` (``malformed`` or ``cast_failed:<column>`` from stage ``ingest``), the source file,
    a stable hash of the raw row, and one ``_dp_blank__<col>`` flag per text column for the counts.
    """
    c_opts = cfg.cleaning
    hashed, dropped = set(cfg.pii.hash), set(cfg.pii.drop)
    lowered = lowercase_columns(cfg)
    ts_fmt, date_fmt = _opt_get(cfg, "timestampFormat"), _opt_get(cfg, "dateFormat")
    keep_line = not (cfg.pii.hash or cfg.pii.drop)

    # Step 1: normalised values (text columns: trimmed, blanks -> null, case-folded) under _dp_n__<s>.
    step1: list[Column] = []
    blanks: list[str] = []
    for col_name in cfg.schema_:
        s = names[col_name]
        src = F.col(s)
        if isinstance(raw.schema[s].dataType, T.StringType):
            norm = F.btrim(src, F.lit(WHITESPACE)) if c_opts.trim else src
            if c_opts.blank_as_null:
                step1.append((src.isNotNull() & (norm == F.lit(""))).alias(f"{BLANK_PREFIX}{s}"))
                blanks.append(f"{BLANK_PREFIX}{s}")
                norm = F.when(norm == F.lit(""), F.lit(None)).otherwise(norm)
            if col_name in lowered:
                norm = F.lower(norm)
        else:
            norm = src
        step1 += [src, norm.alias(f"{_NORM}{s}")]
    df = raw.select(*step1, CORRUPT, SOURCE, EXTRA)

    # Step 2: typed values, failures, PII policy, raw copy.
    typed: list[Column] = []
    raw_fields: list[Column] = []
    reason = F.when(F.col(CORRUPT).isNotNull(), F.lit("malformed"))
    for col_name, typ in cfg.schema_.items():
        s = names[col_name]
        norm = F.col(f"{_NORM}{s}")
        is_text = isinstance(df.schema[f"{_NORM}{s}"].dataType, T.StringType)
        value = _try_cast(f"{_NORM}{s}", typ, ts_fmt if typ == "timestamp" else date_fmt if typ == "date" else None,
                          is_text)
        reason = reason.when(norm.isNotNull() & value.isNull(), F.lit(f"cast_failed:{col_name}"))
        if col_name in dropped:
            continue
        raw_text = F.col(s) if is_text else F.col(s).cast("string")
        if col_name in hashed:
            value = raw_text = salted_hash(norm, salt)
        typed.append(value.alias(s))
        raw_fields.append(raw_text.alias(s))
    raw_struct = F.struct(*raw_fields)
    line = F.coalesce(F.col(CORRUPT), F.lit("")) if keep_line else F.lit("")
    row_hash = F.sha2(F.concat(F.lit(salt or ""), F.to_json(raw_struct), line), 256)
    return df.select(
        *typed,
        raw_struct.alias(RAW),
        (F.col(CORRUPT) if keep_line else F.lit(None).cast("string")).alias(CORRUPT),
        reason.alias(REASON),
        F.when(reason.isNotNull(), F.lit("ingest")).alias(STAGE),
        F.col(SOURCE),
        row_hash.alias(ROW_HASH),
        F.col(EXTRA),
        *blanks,
    )


def lowercase_columns(cfg: Config) -> set[str]:
    """Text columns that ``cleaning.lowercase_categoricals`` folds: not ids, split keys or PII."""
    if not cfg.cleaning.lowercase_categoricals:
        return set()
    exempt = {cfg.id_column, cfg.split_key, *cfg.pii.hash, *cfg.pii.drop}
    return {c for c, t in cfg.schema_.items() if t == "string" and c not in exempt}


def salted_hash(col: Column, salt: str | None) -> Column:
    """Hex SHA-256 of salt + value (null stays null): the one PII hash, for clean and quarantined rows."""
    if not salt:
        raise ValueError("a salted hash needs the salt (resolve_salt() before any Spark work)")
    return F.when(col.isNull(), F.lit(None)).otherwise(F.sha2(F.concat(F.lit(salt), col.cast("string")), 256))


def _try_cast(name: str, typ: str, fmt: str | None, is_text: bool) -> Column:
    """try_cast (null on failure, ANSI mode or not); a configured timestampFormat/dateFormat is honoured."""
    if typ == "string":
        return F.col(name) if is_text else F.col(name).cast("string")
    if fmt and is_text and typ in ("timestamp", "date"):
        ts = F.expr(f"try_to_timestamp(`{name}`, {_sql_str(fmt)})")
        return ts if typ == "timestamp" else ts.cast("date")
    return F.expr(f"try_cast(`{name}` AS {typ})")


def _sql_str(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _opt(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _opt_get(cfg: Config, key: str) -> str | None:
    v = cfg.input.options.get(key)
    return None if v is None else str(v)


def _q(name: str) -> str:
    """Backtick-quote a raw column name for Spark (any characters, dots and backticks included)."""
    return "`" + name.replace("`", "``") + "`"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else exc.__class__.__name__
