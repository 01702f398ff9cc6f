"""Ingest: read raw CSV / JSON / Parquet from any Hadoop URL, enforce the declared columns, try-cast.

Every CSV and JSON value is read as text first, so a value that does not parse keeps its raw text for
the quarantine. The header (CSV) or the key set (JSON, Parquet) is checked against ``schema:`` before
any row is trusted: a missing declared column, or an undeclared one without
``input.allow_extra_columns``, is a ``DataContractError`` naming the column and the file. Raw names are
mapped to safe internal names right after reading. Casting uses ``try_cast`` (null on failure, under
ANSI mode too); a value that was not null before the cast and is null after it is a cast failure.

The PII policy is applied here, before anything is cached: ``pii.hash`` columns are replaced by an
HMAC-SHA256 (keyed by the salt) of their normalised text (in the typed *and* the raw copy), ``pii.drop`` columns are
gone from both, and the text of a malformed line is kept only when no PII policy is configured.

Long: reading three formats under one column contract, PII at read time, and line numbers of
malformed lines are one step of prepare and score.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from downpour.config import Config
from downpour.errors import DataContractError
from downpour.logs import LOG
from downpour.spark import input_split_settings
from downpour.storage import FileInfo, HadoopFS

# Internal helper columns (safe names never start with "_", so these cannot clash).
CORRUPT = "_dp_corrupt"
SOURCE = "_dp_source_file"
REASON = "_dp_reason"
STAGE = "_dp_stage"
RAW = "_dp_raw"
ROW_HASH = "_dp_row_hash"
LINE = "_dp_line_hash"
LINE_NUMBER = "_dp_line_number"
EXTRA = "_dp_extra"
BLANK_PREFIX = "_dp_blank__"

WHITESPACE = " \t\r\n\u00a0"


# ---- names and inputs -------------------------------------------------------------------------------
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
    names = cfg.names
    paths = [f.path for f in files]
    first = next(f.path for f in files if f.size > 0)
    opts = reader_options(cfg, warn=True)
    fmt = cfg.input.format
    try:
        if fmt == "csv":
            df, columns = _read_csv(spark, cfg, paths, first, opts)
        elif fmt == "json":
            df, columns = _read_json(spark, cfg, paths, opts)
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
    reason = F.col(REASON) if REASON in df.columns else F.lit(None).cast("string")
    source = F.col(SOURCE) if SOURCE in df.columns else F.input_file_name()
    # Referencing the extra CSV columns keeps Spark from pruning them, which would hide wrong field counts.
    extra = F.coalesce(*[F.col(_q(c)) for c in extras]).isNull() if extras and fmt == "csv" else F.lit(None)
    return df.select(*cols, corrupt.alias(CORRUPT), reason.alias(REASON), source.alias(SOURCE),
                     extra.cast("boolean").alias(EXTRA))


_MANAGED = ("mode", "columnnameofcorruptrecord", "inferschema", "enforceschema", "primitivesasstring")


def reader_options(cfg: Config, warn: bool = False) -> dict[str, str]:
    """``input.options`` as the readers get them: the keys downpour manages dropped (bad rows are
    quarantined, never skipped) and CSV's ``header`` defaulting to true. Spark reads option keys
    case-insensitively, and so does everything here that looks one up (``_get``)."""
    opts = {k: _opt(v) for k, v in cfg.input.options.items()}
    for k in [k for k in opts if k.lower() in _MANAGED]:
        if warn:
            LOG.warning("input.options.%s is managed by downpour (bad rows are quarantined); ignored", k)
        opts.pop(k)
    if cfg.input.format == "csv" and _get(opts, "header") is None:
        opts["header"] = "true"
    return opts


def _get(opts: dict[str, str], key: str, default: str | None = None) -> str | None:
    """An option by key, whatever its case (as Spark's case-insensitive options read it)."""
    return next((v for k, v in opts.items() if k.lower() == key.lower()), default)


def _read_csv(spark: SparkSession, cfg: Config, paths: list[str], first: str,
              opts: dict[str, str]) -> tuple[DataFrame, list[str]]:
    header = str(_get(opts, "header")).lower() == "true"  # reader_options defaults it to true
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


def _read_json(spark: SparkSession, cfg: Config, paths: list[str],
               opts: dict[str, str]) -> tuple[DataFrame, list[str]]:
    """JSON lines: one row per non-blank line, whatever the line holds.

    Spark's JSON source turns a top-level array line into one row per element (``[]`` into none), so a
    line could silently become zero or several rows. Here every line is read as text and parsed with
    ``from_json`` into one row: an array line is quarantined as ``json_array``, anything that is not
    one object as ``malformed``. The JSON source still reads the files once, for the key set that the
    contract check needs. With ``multiLine`` (one document per file, where a top-level array is the
    normal way to hold records) the JSON source reads the rows itself and expands arrays.
    """
    inferred = (spark.read.options(**opts).option("primitivesAsString", "true").option("mode", "PERMISSIVE")
                .option("columnNameOfCorruptRecord", CORRUPT).json(paths))
    columns = [c for c in inferred.columns if c != CORRUPT]
    if _multiline(opts):
        return inferred, columns
    _check_columns(cfg, columns, paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more)",
                   df=inferred)
    lines = _text_lines(spark, paths, opts).where(_non_blank(F.col("value"), JSON_BLANK))
    schema = T.StructType([T.StructField(c, T.StringType()) for c in cfg.schema_]
                          + [T.StructField(CORRUPT, T.StringType())])
    # line splitting and decoding are done; a comment-only line must stay a (malformed) row, not vanish
    parse_opts = {k: v for k, v in opts.items()
                  if k.lower() not in ("linesep", "encoding", "charset", "samplingratio", "allowcomments")}
    parsed = F.from_json(F.col("value"), schema, {**parse_opts, "mode": "PERMISSIVE",
                                                  "columnNameOfCorruptRecord": CORRUPT})
    is_array = F.col("value").rlike(r"^[ \t\r\n]*\[")
    df = lines.select(parsed.alias("_r"), F.col("value"), is_array.alias("_a"), F.col(SOURCE)).select(
        *[F.when(~F.col("_a"), F.col(f"_r.{_q(c)}")).alias(c) for c in cfg.schema_],
        F.when(F.col("_a") | F.col("_r").isNull(), F.col("value")).otherwise(F.col(f"_r.{CORRUPT}")).alias(CORRUPT),
        F.when(F.col("_a"), F.lit("json_array")).alias(REASON),
        F.col(SOURCE),
    )
    return df, list(cfg.schema_) + [c for c in columns if c not in cfg.schema_]


JSON_BLANK = r"[ \t\r\n]"  # what Jackson skips: a line of only these is no record
CSV_BLANK = r"[\x00-\x20]"  # what Spark's CSV reader trims (String.trim) before skipping an empty line


def _multiline(opts: dict[str, str]) -> bool:
    return str(_get(opts, "multiLine", "false")).lower() == "true"


def _text_lines(spark: SparkSession, paths: list[str], opts: dict[str, str]) -> DataFrame:
    """Every physical line of ``paths`` as decoded text (``value``) with its file (``_dp_source_file``),
    split exactly as the CSV and JSON sources split them (Hadoop's line reader, ``lineSep``)."""
    charset = _get(opts, "encoding") or _get(opts, "charset") or "UTF-8"
    sep = _get(opts, "lineSep")
    text_opts = {"lineSep": sep, "encoding": charset} if sep is not None else {}  # the separator's bytes
    lines = spark.read.options(**text_opts).format("text").load(paths)
    return lines.select(F.decode(F.col("value").cast("binary"), charset).alias("value"),
                        F.input_file_name().alias(SOURCE))


def _non_blank(value: Column, blank: str) -> Column:
    """Any character outside the ``blank`` class: a search that stops at the first one (a
    ``regexp_replace`` of the whole line took 3-5x as long on 2M lines: benchmarks/README.md,
    "Investigation: per-row expressions and the hot-key count")."""
    if not (blank.startswith("[") and not blank.startswith("[^") and blank.endswith("]")):
        raise ValueError(f"_non_blank needs a positive character class such as '[ \\t]', not {blank!r}")
    return value.rlike("[^" + blank[1:])


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


def split_settings(spark: SparkSession, cfg: Config, files: list[FileInfo]) -> dict[str, str]:
    """The session settings under which a stage scans ``files``: input splits that fill whole waves of
    the cores (``downpour.spark.input_split_settings``; a multi-line input is read file by file)."""
    return input_split_settings(spark, files, cfg.input.format, _multiline(reader_options(cfg)))


# ---- the independent count --------------------------------------------------------------------------
def count_input_records(spark: SparkSession, cfg: Config, files: list[FileInfo]) -> int:
    """The number of records in the input files, counted without the parsing and tagging it checks.

    CSV and JSON lines: the physical non-blank lines of every file (not comment lines), less one
    header line per CSV file that has any. Parquet: the row counts in the files' footers. A multi-line
    CSV / JSON input has no line-based count: Spark's own reader counts its records instead.
    """
    paths = [f.path for f in files if f.size > 0]
    if not paths:
        return 0
    fmt = cfg.input.format
    opts = reader_options(cfg)
    if fmt == "parquet":  # a column-less count: Spark answers it from the footers' row-group counts
        return int(spark.read.parquet(*paths).count())
    if _multiline(opts):  # Spark's own reader, configured as read_raw configures it
        reader = spark.read.options(**opts).option("mode", "PERMISSIVE")
        return int((reader.csv(paths) if fmt == "csv" else reader.json(paths)).count())
    lines = _text_lines(spark, paths, opts)
    keep = _non_blank(F.col("value"), CSV_BLANK if fmt == "csv" else JSON_BLANK)
    comment = _get(opts, "comment") if fmt == "csv" else None
    if comment:
        keep = keep & ~F.col("value").startswith(comment)
    per_file = lines.where(keep).groupBy(SOURCE).count().collect()
    header = fmt == "csv" and str(_get(opts, "header")).lower() == "true"
    return int(sum(int(r["count"]) - (1 if header else 0) for r in per_file))


# ---- locating malformed lines -----------------------------------------------------------------------
def malformed_line_numbers(spark: SparkSession, cfg: Config, files: list[FileInfo], rows: DataFrame,
                           salt: str | None) -> DataFrame | None:
    """(``_dp_source_file``, ``_dp_line_hash``, ``_dp_line_number``) for the malformed ``rows``: the first
    1-based physical line of their file with the same text, so a row can name its line without
    keeping its text. None when there is none, or for multi-line input (a record is not a line).

    One small action finds the files with malformed rows; only those are re-read. A line's number is
    the lines of the file blocks before its block plus its place in the block, which is its
    ``monotonically_increasing_id`` less the block's first (ids are consecutive within a block), so
    no sort of the lines is needed; only the lines whose hash a malformed row has are kept.
    """
    opts = reader_options(cfg)
    if _multiline(opts) or cfg.input.format == "parquet":
        return None
    wanted = rows.where(F.col(LINE).isNotNull()).select(SOURCE, LINE).distinct()
    sources = {r[0] for r in wanted.select(SOURCE).distinct().collect()}
    if not sources:
        return None
    # input_file_name() is a URL-encoded URI ("file:///a%20b.csv"), the listing has Hadoop paths
    # ("file:/a b.csv"): match them by (scheme, authority, decoded path), read by the listed path
    fs = HadoopFS(spark)
    wanted_keys = {fs.uri_key(src, encoded=True) for src in sources}
    paths = [f.path for f in files if fs.uri_key(f.path) in wanted_keys]
    lines = _text_lines(spark, paths, opts).select(
        F.col(SOURCE), F.input_file_block_start().alias("_b"), F.monotonically_increasing_id().alias("_m"),
        line_hash(F.col("value"), salt).alias(LINE))
    blocks = lines.groupBy(SOURCE, "_b").agg(F.min("_m").alias("_m0"), F.count(F.lit(1)).alias("_n"))
    before = F.sum("_n").over(Window.partitionBy(SOURCE).orderBy("_b")) - F.col("_n")
    blocks = blocks.select(SOURCE, "_b", "_m0", before.alias("_before"))
    hits = lines.join(wanted, [SOURCE, LINE], "left_semi").join(F.broadcast(blocks), [SOURCE, "_b"])
    number = F.col("_before") + (F.col("_m") - F.col("_m0")) + 1
    return hits.groupBy(SOURCE, LINE).agg(F.min(number).alias(LINE_NUMBER))


# ---- parsing ----------------------------------------------------------------------------------------
_NORM = "_dp_n__"
_TRIM = "_dp_t__"
_VALUE = "_dp_v__"
_PSEUDO = "_dp_p__"


def parse_columns(raw: DataFrame, cfg: Config, salt: str | None) -> DataFrame:
    """Normalise text, apply the PII policy, try-cast to the declared types and tag failures.

    Returns the declared columns (typed; ``pii.hash`` ones as hex digests; ``pii.drop`` ones gone)
    plus ``_dp_raw`` (the raw text of every kept column, PII-sanitised), ``_dp_reason`` /
    ``_dp_stage`` (``malformed`` or ``cast_failed:<column>`` from stage ``ingest``), the source file,
    without an id column a stable hash of the raw row (null with one), and one ``_dp_blank__<col>``
    flag per text column for the counts.

    Why in projections that each compute a value once (trimmed text; typed values and pseudonyms; the
    reason; the stage): an expression written twice into one projection is evaluated twice per row when
    one use sits in a conditional branch (Spark 3.5 shares only unconditional uses), so the trim, the
    try-casts, the HMAC and the whole reason chain ran two or three times per row. A column referenced
    twice by the next projection is not inlined into it (``CollapseProject`` keeps costly producers).
    """
    names = cfg.names
    c_opts = cfg.cleaning
    hashed, dropped = set(cfg.pii.hash), set(cfg.pii.drop)
    lowered = lowercase_columns(cfg)
    ts_fmt, date_fmt = _opt_get(cfg, "timestampFormat"), _opt_get(cfg, "dateFormat")
    keep_line = not (cfg.pii.hash or cfg.pii.drop)
    text = {c for c in cfg.schema_ if isinstance(raw.schema[names[c]].dataType, T.StringType)}

    # Step 1: normalised values (text columns: trimmed, blanks -> null, case-folded) under _dp_n__<s>.
    if c_opts.trim and text:
        raw = raw.select("*", *[F.btrim(F.col(names[c]), F.lit(WHITESPACE)).alias(f"{_TRIM}{names[c]}")
                                for c in cfg.schema_ if c in text])
    step1: list[Column] = []
    blanks: list[str] = []
    for col_name in cfg.schema_:
        s = names[col_name]
        src = F.col(s)
        if col_name in text:
            norm = F.col(f"{_TRIM}{s}") if c_opts.trim else src
            if c_opts.blank_as_null:
                step1.append((src.isNotNull() & (norm == F.lit(""))).alias(f"{BLANK_PREFIX}{s}"))
                blanks.append(f"{BLANK_PREFIX}{s}")
                norm = F.when(norm == F.lit(""), F.lit(None)).otherwise(norm)
            if col_name in lowered:
                norm = F.lower(norm)
        else:
            norm = src
        step1 += [src, norm.alias(f"{_NORM}{s}")]
    df = raw.select(*step1, CORRUPT, REASON, SOURCE, EXTRA)

    # Step 2: typed values and pseudonyms, each computed once (the reason and the raw copy read them).
    casts = {c: _try_cast(f"{_NORM}{names[c]}", t, ts_fmt if t == "timestamp" else date_fmt if t == "date" else None,
                          c in text)
             for c, t in cfg.schema_.items() if t != "string"}  # a cast to text never fails: nothing to check
    pseudonyms = {c: salted_hash(F.col(f"{_NORM}{names[c]}"), salt) for c in cfg.schema_
                  if c in hashed and c not in dropped}
    df = df.select("*", *[v.alias(f"{_VALUE}{names[c]}") for c, v in casts.items()],
                   *[v.alias(f"{_PSEUDO}{names[c]}") for c, v in pseudonyms.items()])

    # Step 3: failures, PII policy, raw copy.
    typed: list[Column] = []
    raw_fields: list[Column] = []
    hash_fields: list[Column] = []
    malformed = F.col(CORRUPT).isNotNull()
    reason = F.when(F.col(REASON).isNotNull(), F.col(REASON)).when(malformed, F.lit("malformed"))
    for col_name in cfg.schema_:
        s = names[col_name]
        norm = F.col(f"{_NORM}{s}")
        is_text = col_name in text
        if col_name in casts:
            value = F.col(f"{_VALUE}{s}")
            reason = reason.when(norm.isNotNull() & value.isNull(), F.lit(f"cast_failed:{col_name}"))
        else:
            value = norm if is_text else norm.cast("string")
        if col_name in dropped:
            continue
        raw_text = F.col(s) if is_text else F.col(s).cast("string")
        if col_name in hashed:
            value = raw_text = F.col(f"{_PSEUDO}{s}")
        hash_fields.append(raw_text.alias(s))  # pseudonymised: the hash can become row_id (no id column)
        typed.append(value.alias(s))
        raw_fields.append(shift_safe(raw_text, malformed, keep_line).alias(s))
    # without an id column: the de-duplication key and row_id, keyed by the salt when there is one, over
    # the parsed values (PII pseudonymised) and the malformed line. With one, no row pays for it (the
    # de-duplication breaks ties on the parsed values themselves: clean.deduplicate).
    if cfg.id_column:
        row_hash = F.lit(None).cast("string")
    else:
        row_text = F.concat(F.to_json(F.struct(*hash_fields)), F.coalesce(F.col(CORRUPT), F.lit("")))
        row_hash = salted_hash(row_text, salt) if salt else F.sha2(row_text, 256)
    out = [
        *typed,
        F.struct(*raw_fields).alias(RAW),
        (F.col(CORRUPT) if keep_line else F.lit(None).cast("string")).alias(CORRUPT),
        F.when(malformed, line_hash(F.col(CORRUPT), salt)).alias(LINE),
        reason.alias(REASON),
        F.col(SOURCE),
        row_hash.alias(ROW_HASH),
        F.col(EXTRA),
        *blanks,
    ]
    tagged = df.select(*out)
    # Step 4: the stage from the reason column (written into the step above, the chain ran twice a row)
    stage = F.when(F.col(REASON).isNotNull(), F.lit("ingest")).alias(STAGE)
    cols = [F.col(c) for c in tagged.columns]
    at = tagged.columns.index(REASON) + 1
    return tagged.select(*cols[:at], stage, *cols[at:])


def shift_safe(raw_text: Column, malformed: Column, keep_line: bool) -> Column:
    """The raw text of a field as the quarantine may keep it. A malformed line's fields may hold another
    column's text (an unquoted comma in a name shifts the email into the next slot; a missing field
    shifts it into the previous one), and no position of a line with the wrong field count is
    provably unshifted: under a PII policy no field of such a line is kept (its line number is)."""
    return raw_text if keep_line else F.when(~malformed, raw_text)


def line_hash(text: Column, salt: str | None) -> Column:
    """A line's text as a key: how a malformed row finds its line number without keeping its text
    (HMAC with the salt when there is one: the line may hold PII)."""
    return salted_hash(text, salt) if salt else F.sha2(text, 256)


def lowercase_columns(cfg: Config) -> set[str]:
    """Text columns that ``cleaning.lowercase_categoricals`` folds: not ids, split keys or PII."""
    if not cfg.cleaning.lowercase_categoricals:
        return set()
    exempt = {cfg.id_column, cfg.split_key, *cfg.pii.hash, *cfg.pii.drop}
    return {c for c, t in cfg.schema_.items() if t == "string" and c not in exempt}


def salted_hash(col: Column, salt: str | None) -> Column:
    """Hex HMAC-SHA256 of the value's UTF-8 text keyed by the salt (null stays null): the one PII
    pseudonym, for clean and quarantined rows. HMAC, not ``sha2(salt || value)``: a keyed hash that
    length extension and chosen-prefix tricks cannot forge, computed here from Spark's own SHA-256 as
    ``H((K ^ opad) || H((K ^ ipad) || m))`` so that no Python UDF is needed."""
    if not salt:
        raise ValueError("a salted hash needs the salt (resolve_salt() before any Spark work)")
    inner_key, outer_key = hmac_pads(salt)
    inner = F.unhex(F.sha2(F.concat(F.lit(inner_key), F.encode(col.cast("string"), "UTF-8")), 256))
    return F.when(col.isNull(), F.lit(None)).otherwise(F.sha2(F.concat(F.lit(outer_key), inner), 256))


def hmac_pads(salt: str) -> tuple[bytes, bytes]:
    """(K ^ ipad, K ^ opad) for HMAC-SHA256 with the salt's UTF-8 bytes as the key (RFC 2104)."""
    key = salt.encode()
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def pseudonym(value: str, salt: str) -> str:
    """The same pseudonym in plain Python (tests, and users matching their own records)."""
    import hmac

    return hmac.new(salt.encode(), value.encode(), hashlib.sha256).hexdigest()


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
