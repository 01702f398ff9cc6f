"""Serving the exported SavedModel inside Spark (``mapInPandas``): what evaluation and ``score`` share.

Each Python worker loads the model once (module-level cache, reused across tasks because Spark reuses
Python workers) and feeds it Arrow batches of bounded size: Spark cuts batches at
``spark.sql.execution.arrow.maxRecordsPerBatch`` (set from ``evaluation.score_batch_rows`` while a
scoring job runs) and the worker cuts them again to the same bound, so memory per task stays flat
whatever the partition size. TensorFlow in a worker uses ``spark.task.cpus`` threads, so concurrent
tasks on an executor do not oversubscribe its cores.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from downpour.errors import DataContractError

SCORE = "score"
ERROR = "score_error"
ARROW_BATCH = "spark.sql.execution.arrow.maxRecordsPerBatch"

_CACHE: dict[tuple[str, str, str], tuple[Any, Any, dict[str, Any]]] = {}
_CACHE_MODELS = 3
_LOCAL_COPIES: dict[str, str] = {}
_LOCK = threading.Lock()


def score_bucket(score: Any) -> Any:
    """floor(score x DECISION_RESOLUTION) in double precision (a float32 score widened first, never
    multiplied in float32): what evaluate costs a decision threshold on and score compares with it."""
    from pyspark.sql import functions as F

    from downpour.artifact import DECISION_RESOLUTION

    return F.floor(score.cast("double") * F.lit(float(DECISION_RESOLUTION))).cast("long")


# ---- model loading (runs in the driver for the signature, in each Python worker for scoring) ---------

def _local_model_dir(model_url: str, fingerprint: str) -> str:
    """The SavedModel directory on this machine: itself when local/mounted, else one download per worker."""
    from downpour import storage

    if storage.is_local(model_url):
        return storage.local_path(model_url)
    key = f"{model_url}@{fingerprint}"
    if key not in _LOCAL_COPIES:
        _LOCAL_COPIES[key] = storage.download_dir(model_url, tempfile.mkdtemp(prefix="downpour-model-"))
    return _LOCAL_COPIES[key]


def model_fingerprint(model_url: str) -> str:
    """Changes whenever the SavedModel at ``model_url`` is replaced (the worker cache is keyed by it)."""
    from downpour import storage

    pb = storage.join(model_url, "saved_model.pb")
    try:
        return storage.file_stamp(pb)
    except (OSError, ValueError) as exc:
        raise DataContractError(f"model {model_url}: saved_model.pb is missing or unreadable ({exc}); "
                                "run `downpour train` first or pass the model directory") from exc


def load_signature(model_url: str, signature: str, threads: int | None = None,
                   fingerprint: str | None = None) -> tuple[Any, dict[str, Any]]:
    """(concrete function, {input name: TensorSpec}) of a SavedModel signature, cached per process."""
    key = (model_url, signature, fingerprint or model_fingerprint(model_url))
    with _LOCK:
        if key not in _CACHE:
            # TensorFlow's INFO banners (oneDNN, CPU features) would repeat for every Python worker;
            # warnings and errors still show, and a TF_CPP_MIN_LOG_LEVEL set by the user wins
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
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
