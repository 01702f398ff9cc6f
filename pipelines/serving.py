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
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from downpour.artifact import CONTRIBUTIONS, EXPLAIN_ALPHAS, completeness_gap
from downpour.errors import DataContractError
from downpour.spark import session_conf

SCORE = "score"
ERROR = "score_error"
REASON_GAP = "_reason_gap"  # per row: |sum of all attributions - (score - baseline score)| (not written out)
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


@dataclass(frozen=True)
class Reasons:
    """Reason codes to add while scoring: the model's explain signature, its feature names (model card
    ``explain``), how many reasons per row and how many path steps (``scoring.reason_codes``)."""

    signature: str
    features: tuple[str, ...]
    baseline_score: float
    top_k: int
    steps: int

    def columns(self) -> list[str]:
        return [c for i in range(1, self.top_k + 1) for c in (f"reason_{i}", f"reason_{i}_contribution")]


def top_reasons(contributions: np.ndarray, features: tuple[str, ...], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(names [n, k], contributions [n, k]) of the k features that pushed each row's score up most;
    fewer than k pushed it up: the rest are None / NaN."""
    contributions = np.asarray(contributions, dtype=np.float64)
    k = min(k, contributions.shape[1])
    order = np.argsort(-contributions, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(contributions, order, axis=1)
    names = np.asarray(features, dtype=object)[order]
    up = values > 0
    names[~up] = None
    values[~up] = np.nan
    return names, values


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


def _predict(fn: Any, specs: dict[str, Any], pdf: pd.DataFrame, reasons: Reasons | None) -> dict[str, np.ndarray]:
    """{"score": [n]} (+ {"contributions": [n, features]} with reasons) for the rows of ``pdf``."""
    import tensorflow as tf

    data = {k: v for k, v in specs.items() if k != EXPLAIN_ALPHAS}
    feeds = {k: tf.constant(v) for k, v in serving_arrays(pdf, data).items()}
    if reasons is not None:
        feeds[EXPLAIN_ALPHAS] = tf.linspace(0.0, 1.0, reasons.steps + 1)
    out = fn(**feeds)
    got = {SCORE: np.asarray(out[SCORE], dtype=np.float32).reshape(-1)}
    if reasons is not None:
        got[CONTRIBUTIONS] = np.asarray(out[CONTRIBUTIONS], dtype=np.float64).reshape(len(pdf), -1)
    return got


def _failed(rows: int, reasons: Reasons | None) -> dict[str, np.ndarray]:
    out = {SCORE: np.full(rows, np.nan, dtype=np.float32)}
    if reasons is not None:
        out[CONTRIBUTIONS] = np.full((rows, len(reasons.features)), np.nan)
    return out


def _predict_or_isolate(fn: Any, specs: dict[str, Any], pdf: pd.DataFrame,
                        reasons: Reasons | None) -> tuple[dict[str, np.ndarray], list]:
    """Model outputs and per-row errors: a failing batch is halved until the rows that fail are found."""
    try:
        got = _predict(fn, specs, pdf, reasons)
        errors: list[str | None] = [None] * len(pdf)
    except Exception as exc:  # noqa: BLE001 - any model error is a per-row quarantine reason
        if len(pdf) == 1:
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc.__class__.__name__
            return _failed(1, reasons), [f"model error: {msg}"]
        mid = len(pdf) // 2
        g1, e1 = _predict_or_isolate(fn, specs, pdf.iloc[:mid], reasons)
        g2, e2 = _predict_or_isolate(fn, specs, pdf.iloc[mid:], reasons)
        return {k: np.concatenate([g1[k], g2[k]]) for k in g1}, e1 + e2
    bad = ~np.isfinite(got[SCORE])
    for i in np.nonzero(bad)[0]:
        errors[i] = "model returned a non-finite score"
    return got, errors


def _with_reasons(out: pd.DataFrame, got: dict[str, np.ndarray], reasons: Reasons) -> None:
    contributions = got[CONTRIBUTIONS].copy()
    # a row whose attributions are not finite (an extreme value saturates the score) keeps its score
    # and gets no reasons; its gap is null, and score counts it as unexplained
    contributions[~np.isfinite(contributions).all(axis=1)] = np.nan
    names, values = top_reasons(contributions, reasons.features, reasons.top_k)
    for i in range(reasons.top_k):
        has = i < names.shape[1]
        out[f"reason_{i + 1}"] = pd.Series(names[:, i] if has else [None] * len(out), dtype=object)
        out[f"reason_{i + 1}_contribution"] = values[:, i] if has else np.nan
    out[REASON_GAP] = completeness_gap(contributions, got[SCORE], reasons.baseline_score)


def _score_partition(batches: Iterable[pd.DataFrame], model_url: str, signature: str, fingerprint: str,
                     keep: list[str], batch_rows: int, threads: int, isolate: bool,
                     reasons: Reasons | None) -> Iterator[pd.DataFrame]:
    fn, specs = load_signature(model_url, signature, threads, fingerprint)
    for pdf in batches:
        for start in range(0, len(pdf), batch_rows):
            chunk = pdf.iloc[start:start + batch_rows]
            out = chunk[keep].reset_index(drop=True)
            if isolate:
                got, errors = _predict_or_isolate(fn, specs, chunk, reasons)
            else:
                got, errors = _predict(fn, specs, chunk, reasons), None
            out[SCORE] = got[SCORE]
            if reasons is not None:
                _with_reasons(out, got, reasons)
            if isolate:
                out[ERROR] = pd.Series(errors, dtype=object)
            yield out


def score_dataframe(df: DataFrame, model_url: str, signature: str, keep: list[str], batch_rows: int,
                    isolate_errors: bool = False, reasons: Reasons | None = None) -> DataFrame:
    """``keep`` columns + ``score`` (float) [+ reason columns] [+ ``score_error``] for every row of
    ``df`` (lazy).

    The signature's inputs are read from ``df`` by name. With ``isolate_errors`` a row the model cannot
    score gets a null score and a reason instead of failing the job (``downpour score``); without it,
    any model error fails the job (evaluation of shards, which are clean by contract). With
    ``reasons`` the model's explain signature is served instead of ``signature`` and each row gets
    ``reason_i``, ``reason_i_contribution`` (i = 1..top_k) and ``_reason_gap``.
    """
    if reasons is not None:
        signature = reasons.signature
    fingerprint = model_fingerprint(model_url)
    inputs = [c for c in signature_inputs(model_url, signature, fingerprint) if c != EXPLAIN_ALPHAS]
    if reasons is not None:
        fn, _ = load_signature(model_url, signature, fingerprint=fingerprint)
        width = fn.structured_outputs[CONTRIBUTIONS].shape[-1]
        if width != len(reasons.features):
            raise DataContractError(f"model {model_url}: its {signature!r} signature explains {width} features, its "
                                    f"model card names {len(reasons.features)}; the card and the SavedModel do "
                                    "not belong together")
    missing = [c for c in inputs if c not in df.columns]
    if missing:
        raise DataContractError(f"column {missing[0]!r}: the model's {signature!r} signature needs it, "
                                f"the data to score does not have it")
    fields = {f.name: f for f in df.schema}
    reason_fields = [] if reasons is None else [
        T.StructField(c, T.StringType() if not c.endswith("_contribution") else T.DoubleType(), True)
        for c in reasons.columns()] + [T.StructField(REASON_GAP, T.DoubleType(), True)]
    out_schema = T.StructType(
        [fields[c] for c in keep] + [T.StructField(SCORE, T.FloatType(), True)] + reason_fields
        + ([T.StructField(ERROR, T.StringType(), True)] if isolate_errors else [])
    )
    threads = int(df.sparkSession.conf.get("spark.task.cpus", "1") or 1)
    cols = list(dict.fromkeys([*keep, *inputs]))
    rows = int(batch_rows)

    def run(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        return _score_partition(batches, model_url, signature, fingerprint, keep, rows, threads,
                                isolate_errors, reasons)

    return df.select(*cols).mapInPandas(run, out_schema)


def arrow_batch_rows(spark: SparkSession, rows: int) -> contextlib.AbstractContextManager[None]:
    """Bound Arrow batches to ``rows`` for the Spark actions run inside the block."""
    return session_conf(spark, {ARROW_BATCH: str(int(rows))})
