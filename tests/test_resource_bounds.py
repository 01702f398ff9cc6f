"""Resource bounds: `prepare` and `score` on 10x the rows keep Python worker and driver memory flat.

Both stages stream: prepare's only Python code on the data is the hash-bucket pandas UDF (merchant
ids, conf/fraud.yaml), scoring's is the SavedModel in ``mapInPandas``; each sees Arrow batches of a
bounded number of rows, so a Python worker's memory must not depend on how many rows a task gets.
The driver only collects aggregates (counts per bucket, statistics, vocabularies), never rows. One of
them does grow with the rows up to a cap: the time split's exact histogram (pipelines/split.py) has
one entry per non-empty time bucket, at most 100,000, so the driver collects ~10k entries at 1x and
~60k at 10x here (measured: +16 MiB of driver RSS, 129 -> 145 MiB); from ~100k events on it is flat.

How it is measured. Every run is its own ``python -m downpour`` process on ``local[2]``, watched from
outside by :class:`benchmarks.procmem.PeakRSS` (``/proc`` sampling plus the kernel's high-water marks):
fresh processes, because Spark reuses its Python workers, so inside one long-lived session a worker
grown by an earlier job (or test) would set both peaks and hide any growth. Arrow batches are cut at
1,000 rows, so even the 1x run is many batches per task, and with two shuffle partitions 10x the rows
is 10x the rows per task through the same number of workers: a per-row accumulation anywhere in a
worker shows up as growth.

The bound: the 10x run's peak may exceed the 1x run's by at most 16 MiB for the largest Python worker
and 32 MiB for the driver (measured growth: about 1 MiB for the workers; 16 MiB for prepare's driver, the
histogram above). An absolute bound, not a ratio: scoring workers hold TensorFlow (~575 MiB), so even
"1.25 x + slack" would allow 190 MiB of growth, far more than a scorer that materialises its whole
partition adds at this scale (checked by patching ``_score_partition`` to ``pd.concat`` its batches:
576 -> 614 MiB, +38 MiB, which this bound catches and a ratio would not). Prepare's workers see one
short string column (merchant ids), so there only an accumulation of hundreds of bytes per row shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from benchmarks.procmem import PeakRSS

ROOT = Path(__file__).resolve().parents[1]
FRAUD = ROOT / "conf" / "fraud.yaml"
ROWS = 10_000  # 1x; 10x is 100,000
BATCH = 1000
WORKER_GROWTH_MB, DRIVER_GROWTH_MB = 16.0, 32.0
# local[2] as in the tests' session; small Arrow batches for the hash UDF (prepare) and for scoring; two
# shuffle partitions, so that rows per task grow with the input (and fewer tasks keep the test short)
SETTINGS = ["spark.master=local[2]", f"evaluation.score_batch_rows={BATCH}",
            f'spark.conf={{"spark.sql.execution.arrow.maxRecordsPerBatch": {BATCH}, '
            '"spark.sql.shuffle.partitions": 2, "spark.ui.showConsoleProgress": false}']
SET_ARGS = [x for s in SETTINGS for x in ("--set", s)]


def fraud_frame(rows: int, seed: int = 7) -> pd.DataFrame:
    """Rows shaped like conf/fraud.yaml's input (PII columns included), from numpy in well under a
    second: ~20 events per card over 90 days, 5,000 merchants, 2 % fraud with larger amounts."""
    rng = np.random.default_rng(seed)
    card = rng.integers(0, max(1, rows // 20), rows)
    secs = np.sort(rng.integers(0, 90 * 86400, rows)).astype("timedelta64[s]")
    ts = np.char.replace((np.datetime64("2024-01-01T00:00:00") + secs).astype(str), "T", " ")
    countries = np.array(["US", "GB", "DE", "FR", "AU", "CA", "IN", "BR"])
    home = countries[card % len(countries)]
    fraud = (rng.random(rows) < 0.02).astype(int)

    def pick(values: list[str]) -> np.ndarray:
        return np.array(values)[rng.integers(0, len(values), rows)]

    return pd.DataFrame({
        "transaction_id": [f"tx_{seed}_{i:09d}" for i in range(rows)],
        "event_ts": ts,
        "card_id": [f"card_{c:09d}" for c in card],
        "customer_id": [f"CUS{c:09d}" for c in card // 2],
        "merchant_id": [f"M{m:07d}" for m in rng.integers(0, 5000, rows)],
        "merchant_category": pick(["retail", "grocery", "travel", "restaurants", "online"]),
        "amount": np.round(np.exp(rng.normal(3.5, 1.2, rows)) * (1 + 3 * fraud), 2),
        "currency": pick(["USD", "GBP", "EUR", "AUD"]),
        "country": home,
        "device_id": [f"dev_{d:08x}" for d in card * 7 + rng.integers(0, 2, rows)],
        "ip_country": np.where(rng.random(rows) < 0.05, pick(list(countries)), home),
        "channel": pick(["online", "pos", "contactless"]),
        "card_number": "4111111111111111",
        "customer_name": "Jane Doe",
        "email": "jane@example.com",
        "is_fraud": fraud,
    })


def _watched(stage: str, *args: str) -> dict[str, Any]:
    """Run ``downpour <stage>`` in its own process; its PeakRSS summary and wall time (reported only)."""
    cmd = [sys.executable, "-m", "downpour", stage, "--conf", str(FRAUD), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK_GATEWAY")}
    env["DOWNPOUR_DRIVER_MEMORY"] = "1g"
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakRSS(root=proc.pid, interval_s=0.1) as mem:
        try:
            _, err = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, f"downpour {stage} exited {proc.returncode}:\n{err[-4000:]}"
    return {**mem.summary(), "seconds": round(time.monotonic() - t0, 1)}


def _export_untrained_model(prepared: Path, dest: Path) -> Path:
    """The real wide & deep model of this feature state, exported as training exports it (both
    signatures), untrained: scoring costs the same whatever the weights, and training would cost
    a minute of Horovod this test is not about."""
    from downpour.config import load_config
    from downpour.training.export import export_saved_model
    from downpour.training.model import build_model

    state = json.loads((prepared / "feature_state.json").read_text())
    manifest = json.loads((prepared / "manifest.json").read_text())
    model = build_model(state, load_config(FRAUD).training)
    export_saved_model(model, state, 0.0, str(dest / "saved_model"))
    (dest / "model_card.json").write_text(json.dumps({"model_version": "untrained-bounds",
                                                      "data_version": manifest["data_version"]}))
    return dest


@pytest.mark.slow
def test_prepare_and_score_memory_flat_on_10x_rows(tmp_path):
    raw = {}
    for name, rows in (("1x", ROWS), ("10x", 10 * ROWS)):
        raw[name] = tmp_path / f"fraud_{name}.csv"
        fraud_frame(rows, seed=7 if name == "1x" else 8).to_csv(raw[name], index=False)

    prep: dict[str, dict[str, Any]] = {}
    for name in ("1x", "10x"):
        out = tmp_path / f"out_{name}"
        prep[name] = _watched("prepare", "--set", f"input.path={raw[name]}", "--set", f"output.path={out}",
                              *SET_ARGS)
        manifest = json.loads((out / "prepared" / "manifest.json").read_text())
        assert manifest["counts"]["clean"] == (ROWS if name == "1x" else 10 * ROWS)

    model = _export_untrained_model(tmp_path / "out_1x" / "prepared", tmp_path / "model")
    score: dict[str, dict[str, Any]] = {}
    for name in ("1x", "10x"):
        scores = tmp_path / f"scores_{name}"
        score[name] = _watched("score", "--input", str(raw[name]), "--output", str(scores), "--model", str(model),
                               "--set", f"output.path={tmp_path / 'out_1x'}", *SET_ARGS)
        assert pq.read_table(scores).num_rows == (ROWS if name == "1x" else 10 * ROWS)
        summary = json.loads(Path(f"{scores}_summary.json").read_text())
        assert summary["history"]["used"], "score runs with the entity history of the prepared data"

    print("\nresource bounds (MiB):", json.dumps({"prepare": prep, "score": score}))
    for stage, peaks in (("prepare", prep), ("score", score)):
        one, ten = peaks["1x"], peaks["10x"]
        # Python workers did the work (prepare: the merchant-id hash UDF; score: the model)...
        assert "pyspark" in one["peak_by_kind_mb"] and "pyspark" in ten["peak_by_kind_mb"], f"{stage}: {peaks}"
        assert ten["peak_worker_mb"] <= one["peak_worker_mb"] + WORKER_GROWTH_MB, f"{stage} workers: {peaks}"
        # ...and the driver only collects aggregates.
        assert ten["driver_mb"] <= one["driver_mb"] + DRIVER_GROWTH_MB, f"{stage} driver: {peaks}"
    # scoring loads TensorFlow in its workers: the measurement sees them (a sanity check of the probe)
    assert score["1x"]["peak_worker_mb"] > prep["1x"]["peak_worker_mb"]
