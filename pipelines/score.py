"""Batch scoring with the exported SavedModel inside Spark (``mapInPandas``), for evaluation and ``score``.

Each Python worker loads the model once (module-level cache, reused across tasks because Spark reuses
Python workers) and feeds it Arrow batches of bounded size: Spark cuts batches at
``spark.sql.execution.arrow.maxRecordsPerBatch`` (set from ``evaluation.score_batch_rows`` while a
scoring job runs) and the worker cuts them again to the same bound, so memory per task stays flat
whatever the partition size. TensorFlow in a worker uses ``spark.task.cpus`` threads, so concurrent
tasks on an executor do not oversubscribe its cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from downpour.config import Config
from downpour.errors import DataContractError
from downpour.logs import LOG, timed

SCORE = "score"
ERROR = "score_error"
ARROW_BATCH = "spark.sql.execution.arrow.maxRecordsPerBatch"

_CACHE: dict[tuple[str, str, str], tuple[Any, Any, dict[str, Any]]] = {}
_CACHE_MODELS = 3
_LOCAL_COPIES: dict[str, str] = {}
_LOCK = threading.Lock()


# ---- model loading (runs in the driver for the signature, in each Python worker for scoring) ---------

def _local_model_dir(model_url: str, fingerprint: str) -> str:
    """The SavedModel directory on this machine: itself when local/mounted, else one download per worker."""
    from training import storage

    if storage.is_local(model_url):
        return storage.local_path(model_url)
    key = f"{model_url}@{fingerprint}"
    if key not in _LOCAL_COPIES:
        _LOCAL_COPIES[key] = storage.download_dir(model_url, tempfile.mkdtemp(prefix="downpour-model-"))
    return _LOCAL_COPIES[key]


def model_fingerprint(model_url: str) -> str:
    """Changes whenever the SavedModel at ``model_url`` is replaced (the worker cache is keyed by it)."""
    from training import storage

    pb = storage.join(model_url, "saved_model.pb")
    try:
        if storage.is_local(model_url):
            st = os.stat(storage.local_path(pb))
            return f"{st.st_mtime_ns}-{st.st_size}-{st.st_ino}"
        from pyarrow import fs as pafs

        uri = pb.replace("s3a://", "s3://", 1).replace("s3n://", "s3://", 1)
        fs, path = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(path)
        return f"{info.mtime_ns}-{info.size}"
    except (OSError, ValueError) as exc:
        raise DataContractError(f"model {model_url}: saved_model.pb is missing or unreadable ({exc}); "
                                "run `downpour train` first or pass the model directory") from exc


def load_signature(model_url: str, signature: str, threads: int | None = None,
                   fingerprint: str | None = None) -> tuple[Any, dict[str, Any]]:
    """(concrete function, {input name: TensorSpec}) of a SavedModel signature, cached per process."""
    key = (model_url, signature, fingerprint or model_fingerprint(model_url))
    with _LOCK:
        if key not in _CACHE:
            import tensorflow as tf

            if threads:
                with contextlib.suppress(RuntimeError):  # already initialised in this process: keep it
                    tf.config.threading.set_intra_op_parallelism_threads(threads)
                    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
            path = _local_model_dir(model_url, key[2])
            try:
                loaded = tf.saved_model.load(path)
            except (OSError, ValueError) as exc:
                raise DataContractError(f"model {model_url}: not a loadable SavedModel ({exc})") from exc
            if signature not in loaded.signatures:
                raise DataContractError(f"model {model_url}: has no signature {signature!r} "
                                        f"(it has {sorted(loaded.signatures)})")
            fn = loaded.signatures[signature]
            _, specs = fn.structured_input_signature
            while len(_CACHE) >= _CACHE_MODELS:  # evaluation needs two models at most (new, champion)
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = (loaded, fn, dict(specs))
        _, fn, specs = _CACHE[key]
    return fn, specs


def signature_inputs(model_url: str, signature: str, fingerprint: str | None = None) -> dict[str, str]:
    """{input name: dtype name} of a signature (loads the model in this process once)."""
    _, specs = load_signature(model_url, signature, fingerprint=fingerprint)
    return {k: v.dtype.name for k, v in specs.items()}


def serving_arrays(pdf: pd.DataFrame, specs: dict[str, Any]) -> dict[str, np.ndarray]:
    """pandas columns -> the numpy arrays the signature takes (dtype and rank from its TensorSpecs)."""
    out = {}
    for name, spec in specs.items():
        col = pdf[name]
        dt = spec.dtype
        if dt.name == "string":
            arr = col.fillna("").astype(str).to_numpy(dtype=object)
        elif dt.is_floating:
            arr = pd.to_numeric(col, errors="coerce").to_numpy(dtype=dt.as_numpy_dtype, na_value=np.nan)
        else:
            if col.isna().any():
                raise ValueError(f"column {name!r} has nulls; the model needs {dt.name}")
            arr = col.to_numpy(dtype=dt.as_numpy_dtype)
        if spec.shape.rank == 2:
            arr = arr.reshape(-1, 1)
        out[name] = arr
    return out


def _predict(fn: Any, specs: dict[str, Any], pdf: pd.DataFrame) -> np.ndarray:
    import tensorflow as tf

    feeds = {k: tf.constant(v) for k, v in serving_arrays(pdf, specs).items()}
    return np.asarray(fn(**feeds)[SCORE], dtype=np.float32).reshape(-1)


def _predict_or_isolate(fn: Any, specs: dict[str, Any], pdf: pd.DataFrame) -> tuple[np.ndarray, list]:
    """Scores and per-row errors: a failing batch is halved until the rows that fail are found."""
    try:
        scores = _predict(fn, specs, pdf)
        errors: list[str | None] = [None] * len(pdf)
    except Exception as exc:  # noqa: BLE001 - any model error is a per-row quarantine reason
        if len(pdf) == 1:
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc.__class__.__name__
            return np.array([np.nan], dtype=np.float32), [f"model error: {msg}"]
        mid = len(pdf) // 2
        s1, e1 = _predict_or_isolate(fn, specs, pdf.iloc[:mid])
        s2, e2 = _predict_or_isolate(fn, specs, pdf.iloc[mid:])
        return np.concatenate([s1, s2]), e1 + e2
    bad = ~np.isfinite(scores)
    for i in np.nonzero(bad)[0]:
        errors[i] = "model returned a non-finite score"
    return scores, errors


def _score_partition(batches: Iterable[pd.DataFrame], model_url: str, signature: str, fingerprint: str,
                     keep: list[str], batch_rows: int, threads: int, isolate: bool) -> Iterator[pd.DataFrame]:
    fn, specs = load_signature(model_url, signature, threads, fingerprint)
    for pdf in batches:
        for start in range(0, len(pdf), batch_rows):
            chunk = pdf.iloc[start:start + batch_rows]
            out = chunk[keep].reset_index(drop=True)
            if isolate:
                scores, errors = _predict_or_isolate(fn, specs, chunk)
                out[SCORE] = scores
                out[ERROR] = pd.Series(errors, dtype=object)
            else:
                out[SCORE] = _predict(fn, specs, chunk)
            yield out


def score_dataframe(df: DataFrame, model_url: str, signature: str, keep: list[str], batch_rows: int,
                    isolate_errors: bool = False) -> DataFrame:
    """``keep`` columns + ``score`` (float) [+ ``score_error``] for every row of ``df`` (lazy).

    The signature's inputs are read from ``df`` by name. With ``isolate_errors`` a row the model cannot
    score gets a null score and a reason instead of failing the job (``downpour score``); without it,
    any model error fails the job (evaluation of shards, which are clean by contract).
    """
    fingerprint = model_fingerprint(model_url)
    inputs = signature_inputs(model_url, signature, fingerprint)
    missing = [c for c in inputs if c not in df.columns]
    if missing:
        raise DataContractError(f"column {missing[0]!r}: the model's {signature!r} signature needs it, "
                                f"the data to score does not have it")
    fields = {f.name: f for f in df.schema}
    out_schema = T.StructType(
        [fields[c] for c in keep] + [T.StructField(SCORE, T.FloatType(), True)]
        + ([T.StructField(ERROR, T.StringType(), True)] if isolate_errors else [])
    )
    threads = int(df.sparkSession.conf.get("spark.task.cpus", "1") or 1)
    cols = list(dict.fromkeys([*keep, *inputs]))
    rows = int(batch_rows)

    def run(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        return _score_partition(batches, model_url, signature, fingerprint, keep, rows, threads,
                                isolate_errors)

    return df.select(*cols).mapInPandas(run, out_schema)


@contextlib.contextmanager
def arrow_batch_rows(spark: SparkSession, rows: int) -> Iterator[None]:
    """Bound Arrow batches to ``rows`` for the Spark actions run inside the block."""
    old = spark.conf.get(ARROW_BATCH, None)
    spark.conf.set(ARROW_BATCH, str(int(rows)))
    try:
        yield
    finally:
        if old is None:
            spark.conf.unset(ARROW_BATCH)
        else:
            spark.conf.set(ARROW_BATCH, old)


def model_paths(model_dir: str) -> tuple[str, str]:
    """(model directory, its saved_model directory), symlinks resolved so a re-publish cannot swap it."""
    from training import storage

    root = storage.resolve(model_dir)
    return root, storage.join(root, "saved_model")



# ---- `downpour score`: any raw table -> scores ------------------------------------------------------

RAW_SIGNATURE = "serving_default"
_RAW_JSON = "_dp_raw_json"


class RawInputs:
    """What ``features.state.serving_frame`` needs: the serving dtypes, read from the model's own
    ``serving_default`` signature (the model, not a config, is the truth about what it takes)."""

    def __init__(self, dtypes: dict[str, str]) -> None:
        self.raw_inputs = {k: {"float32": "float64", "double": "float64", "float64": "float64",
                               "int32": "int64", "int64": "int64", "string": "string"}.get(v, v)
                           for k, v in dtypes.items()}


def resolve_model_dir(cfg: Config, model_dir: str | None) -> str:
    """``--model`` (a model directory, or a registry directory: its champion), else ``<output>/model``."""
    from training import storage

    if model_dir is None:
        return storage.join(cfg.output.path, "model")
    champion = storage.join(model_dir, "champion.json")
    if storage.exists(champion):
        from training.registry import champion_model_url

        return champion_model_url(model_dir, storage.read_json(champion))
    return model_dir


def _impute_statistics(cfg: Config, model_root: str, card: dict[str, Any]) -> dict[str, Any]:
    """The imputation statistics of the model's training data (scoring must never recompute them on the
    rows it scores): from the model card, a manifest beside the model (registry versions), or the
    prepared manifest of the same data version."""
    from training import storage

    wanted = {c for c, p in cfg.cleaning.nulls.items() if p.action == "impute" and p.statistic}
    if not wanted:
        return {}
    sources = [card.get("cleaning") or {}]
    for url in (storage.join(model_root, "manifest.json"), storage.join(model_root, "..", "manifest.json"),
                storage.join(cfg.output.path, "prepared", "manifest.json")):
        if storage.exists(url):
            man = storage.read_json(url)
            if man.get("data_version") == card.get("data_version"):
                sources.append(man.get("cleaning") or {})
    for src in sources:
        values = src.get("impute_values") or {}
        if wanted <= set(values):
            return {c: values[c] for c in wanted}
    raise DataContractError(
        f"model {model_root}: the imputation statistics of its training data ({sorted(wanted)}) are not "
        f"available (data_version {card.get('data_version')}); score with the model's registry version or "
        "keep its prepared data")


def _scoring_config(cfg: Config, input_url: str, fmt: str | None) -> tuple[Config, Config]:
    """(config with the scoring input, the same without the label column).

    Scoring rows need no label: the label is taken out of the declared columns (a label column present
    in the input is ignored), and extra input columns are allowed, as for a serving signature.
    """
    inp = cfg.input.model_copy(update={"path": input_url, "format": fmt or cfg.input.format})
    full = cfg.model_copy(update={"input": inp})
    lab = cfg.label.column
    unlabeled = full.model_copy(update={
        "input": inp.model_copy(update={"allow_extra_columns": True}),
        "schema_": {k: v for k, v in cfg.schema_.items() if k != lab},
    })
    return full, unlabeled


def _tag_raw_rows(spark: SparkSession, full: Config, unlabeled: Config, names: dict[str, str], files: list,
                  salt: str | None, stats: dict[str, Any]) -> DataFrame:
    """Raw scoring rows (no label) -> parsed, cleaned and tagged with the model's imputation statistics.

    The one chain for the input and for raw ``--history`` rows, so both are cleaned alike."""
    from pyspark.sql import functions as F

    from pipelines import clean
    from pipelines.ingest import parse_columns, read_raw

    raw = read_raw(spark, unlabeled, files)
    # a placeholder label satisfies the label rules (never output): scoring rows have no label
    raw = raw.withColumn(names[full.label.column], F.lit(str(full.label.positive)))
    return clean.apply_policies(parse_columns(raw, full, names, salt), full, names, stats)


def run_scoring(spark: SparkSession, cfg: Config, input_url: str, output_url: str,
                model_dir: str | None = None, fmt: str | None = None, history: list[str] | None = None,
                history_out: str | None = None, history_store: str | None = None,
                no_history: bool = False) -> dict[str, Any]:
    """Score a raw table: the prepare stage's ingest and cleaning rules, window features over the entity
    history and the input (pipelines/score_history.py), then the model's ``serving_default`` signature;
    Parquet (id, ``score``, ``model_version``) to ``output_url``, every row that cannot be scored to
    ``<output_url>_quarantine`` with its reason, ``<output_url>_summary.json``; returns the summary."""
    from pyspark.sql import functions as F

    from downpour.spark import persist_level
    from features import history as H
    from features.state import serving_frame
    from features.windows import add_window_features
    from pipelines import clean
    from pipelines import score_history as SH
    from pipelines.ingest import (
        LINE,
        LINE_NUMBER,
        RAW,
        REASON,
        ROW_HASH,
        SOURCE,
        STAGE,
        column_names,
        contract_errors,
        count_input_records,
        list_input_files,
        malformed_line_numbers,
    )
    from training import storage

    t0 = time.perf_counter()
    history = list(history or [])
    SH.check_flags(history, history_store, no_history)
    clean.check_policies(cfg)
    salt = clean.resolve_salt(cfg)
    root, saved = model_paths(resolve_model_dir(cfg, model_dir))
    card_url = storage.join(root, "model_card.json")
    if not storage.exists(card_url):
        raise DataContractError(f"{card_url}: no exported model here; run `downpour train` or pass --model")
    card = storage.read_json(card_url)
    version = str(card.get("model_version", "unknown"))
    stats = _impute_statistics(cfg, root, card)
    raw_inputs = signature_inputs(saved, RAW_SIGNATURE, model_fingerprint(saved))

    full, unlabeled = _scoring_config(cfg, input_url, fmt)
    names = column_names(cfg)
    if column_names(unlabeled) != {k: v for k, v in names.items() if k in unlabeled.schema_}:
        raise DataContractError(f"column {cfg.label.column!r}: its safe name collides with another column's; "
                                "rename one of them to score without a label")
    id_out = cfg.id_column or "row_id"
    q_url = f"{output_url.rstrip('/')}_quarantine"
    batch = cfg.evaluation.score_batch_rows
    LOG.info("score: %s with model %s -> %s", input_url, version, output_url)

    def tag_history(url: str) -> tuple[Config, DataFrame]:  # raw --history rows: the input's own chain
        h_full, h_unlabeled = _scoring_config(cfg, url, fmt)
        return h_full, _tag_raw_rows(spark, h_full, h_unlabeled, names, list_input_files(spark, url), salt, stats)

    past = SH.load(spark, full, names, model_root=root, card=card, history=history, store=history_store,
                   no_history=no_history, tag_raw=tag_history)

    with contract_errors(full):
        files = list_input_files(spark, input_url)
        tagged = _tag_raw_rows(spark, full, unlabeled, names, files, salt, stats)
        ident = F.col(names[cfg.id_column]).cast("string") if cfg.id_column else F.col(ROW_HASH)
        raw_schema = tagged.schema[RAW].dataType
        # the raw values travel as one JSON string (the struct is dropped): one copy per row, not two
        tagged = tagged.withColumn("__id", ident).withColumn(_RAW_JSON, F.to_json(F.col(RAW))).drop(RAW, ROW_HASH)
        tagged = tagged.persist(persist_level(spark))
        is_ok = F.col(REASON).isNull()
        with timed("score: ingest and clean"):
            by_outcome = tagged.groupBy(is_ok.alias("ok"), F.col(LINE).isNotNull().alias("malformed")).agg(
                F.count(F.lit(1)).alias("count"), *SH.input_time_columns(full, names, tagged, is_ok)).collect()
            clean_n = {ok: sum(int(r["count"]) for r in by_outcome if r["ok"] == ok) for ok in (True, False)}
            any_malformed = any(r["malformed"] for r in by_outcome)
            times = [r for r in by_outcome if r["ok"] and "t_min" in r and r["t_min"] is not None]
            t_min = min((r["t_min"] for r in times), default=None)
            t_max = max((r["t_max"] for r in times), default=None)
        SH.check_gap(full, past, t_min, input_url)

        ok = tagged.where(is_ok)
        if H.needed(full):
            ok = H.drop_context(add_window_features(H.with_context(SH.clean_events(ok, full, names), past.frame),
                                                    full, names)).drop(H.HID)
        missing = [c for c in raw_inputs if c not in ok.columns]
        if missing:
            raise DataContractError(f"column {missing[0]!r}: the model {version} needs it; it is not produced "
                                    f"from the input {input_url} by this config")
        serving = serving_frame(clean.serving_nulls(ok, full, names), RawInputs(raw_inputs),
                                keep=("__id", _RAW_JSON, SOURCE))
        with arrow_batch_rows(spark, batch), timed(f"score: {RAW_SIGNATURE} in mapInPandas"):
            scored = score_dataframe(serving, saved, RAW_SIGNATURE, keep=["__id", _RAW_JSON, SOURCE],
                                     batch_rows=batch, isolate_errors=True).persist(persist_level(spark))
            outcome = {r["failed"]: r["count"] for r in
                       scored.groupBy(F.col(ERROR).isNotNull().alias("failed")).count().collect()}

        with timed("score: write scores and quarantine"):
            (scored.where(F.col(ERROR).isNull())
             .select(F.col("__id").alias(id_out), F.col(SCORE).cast("double").alias(SCORE),
                     F.lit(version).alias("model_version"))
             .write.mode("overwrite").parquet(output_url))
            lines = malformed_line_numbers(spark, full, files, tagged, salt) if any_malformed else None
            rejected = clean.with_line_numbers(tagged.where(F.col(REASON).isNotNull()), lines).select(
                F.from_json(_RAW_JSON, raw_schema).alias("raw"), F.col(REASON).alias("reason"),
                F.col(STAGE).alias("stage"), F.col(SOURCE).alias("source_file"),
                F.col(LINE_NUMBER).alias("line_number"))
            failed = scored.where(F.col(ERROR).isNotNull()).select(
                F.from_json(_RAW_JSON, raw_schema).alias("raw"), F.col(ERROR).alias("reason"),
                F.lit("score").alias("stage"), F.col(SOURCE).alias("source_file"),
                F.lit(None).cast("long").alias("line_number"))
            # the placeholder label never leaves
            raw_cols = clean.raw_value_columns(full, names, struct="raw", skip=(cfg.label.column,))
            quarantine = rejected.unionByName(failed).select(
                *raw_cols, "reason", "stage", "source_file", "line_number", F.lit(version).alias("model_version"))
            quarantine.write.mode("overwrite").parquet(q_url)
        out_url = history_out or history_store
        rolled = (SH.roll_forward(full, names, past, tagged.where(is_ok), t_min, t_max, out_url)
                  if out_url and H.needed(full) else None)
        tagged.unpersist()
        scored.unpersist()
        records = count_input_records(spark, full, files)  # independent of the parsing it checks

    n_ok, n_rejected = clean_n.get(True, 0), clean_n.get(False, 0)
    n_scored, n_failed = int(outcome.get(False, 0)), int(outcome.get(True, 0))
    counts = {"input": records, "scored": n_scored, "quarantined": n_rejected + n_failed}
    if n_scored + n_failed != n_ok or records != n_scored + n_rejected + n_failed:
        raise RuntimeError(f"score: row accounting broken: the input files hold {records} records; "
                           f"{n_ok} clean rows ({n_scored} scored, {n_failed} failed in the model), "
                           f"{n_rejected} rejected")
    summary = {**counts, "model_version": version, "output": cfg.scrub(output_url), "quarantine": cfg.scrub(q_url),
               "history": {**past.summary(t_min, t_max), "written": rolled} if H.needed(full) else None,
               "seconds": round(time.perf_counter() - t0, 3)}
    storage.write_json_atomic(SH.summary_url(output_url), summary)
    LOG.info("score: %s in %.1fs", json.dumps(counts), time.perf_counter() - t0)
    return {**summary, "output": output_url, "quarantine": q_url}

