"""A synthetic ``prepared/`` directory in the documented shard format, for tests and benchmarks.

It writes what ``downpour prepare`` publishes (model-ready Parquet with several row groups per file,
``manifest.json`` and ``feature_state.json``) straight from numpy, so the training stage can be
exercised and measured without running the prepare stage. Labels follow a known logistic model of
the features, so a model can learn them (a falling loss is a meaningful check).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def feature_state(numeric: int, categorical: int, cardinality: int, crosses: bool = True,
                  weight: bool = False) -> dict[str, Any]:
    """A feature_state.json dict for ``numeric`` n__x* columns and ``categorical`` c__k* columns."""
    vocab = [f"v{j}" for j in range(cardinality - 1)]
    state: dict[str, Any] = {
        "version": 1,
        "numeric": [
            {"name": f"n__x{i}", "source": f"x{i}", "transform": "standardize", "impute": 0.0,
             "clip": [-10.0, 10.0], "mean": 0.0, "std": 1.0}
            for i in range(numeric)
        ],
        "flags": [],
        "categorical": [
            {"name": f"c__k{i}", "sources": [f"k{i}"], "kind": "vocab", "vocab": vocab, "buckets": None,
             "cardinality": cardinality, "embedding_dim": 4}
            for i in range(categorical)
        ],
        "crosses": [],
        "raw_inputs": {**{f"x{i}": "float64" for i in range(numeric)},
                       **{f"k{i}": "string" for i in range(categorical)}},
        "label": "label",
        "weight": "weight" if weight else None,
        "strings": {"trim": True, "lower": False},
        "window_features": [],
        "fitted_rows": 0,
    }
    if crosses and categorical >= 2:
        state["crosses"].append({"name": "c__k0_x_k1", "sources": ["c__k0", "c__k1"],
                                 "cardinalities": [cardinality, cardinality], "kind": "exact",
                                 "cardinality": cardinality * cardinality})
    return state


def make_split(rows: int, state: dict[str, Any], positive_rate: float, seed: int,
               start_id: int = 0) -> pa.Table:
    """Model-ready rows whose label depends on the features through a fixed logistic model."""
    rng = np.random.default_rng(seed)
    coef_rng = np.random.default_rng(12345)  # the same "true" model for every split
    cols: dict[str, np.ndarray] = {}
    logit = np.zeros(rows)
    for spec in state["numeric"]:
        x = rng.standard_normal(rows).astype(np.float32)
        cols[spec["name"]] = x
        logit += coef_rng.normal(0, 1.0) * x
    for spec in state["categorical"]:
        k = rng.integers(0, spec["cardinality"], rows, dtype=np.int64)
        cols[spec["name"]] = k
        logit += coef_rng.normal(0, 1.0, spec["cardinality"])[k]
    for spec in state["crosses"]:
        a, b = (cols[s] for s in spec["sources"])
        cols[spec["name"]] = a * spec["cardinalities"][1] + b  # the "exact" cross of features.state
    logit = (logit - logit.mean()) / (logit.std() + 1e-9) * 2.0
    # shift the intercept so that the base rate is about positive_rate
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if (1 / (1 + np.exp(-(logit + mid)))).mean() > positive_rate:
            hi = mid
        else:
            lo = mid
    p = 1 / (1 + np.exp(-(logit + lo)))
    cols["label"] = (rng.random(rows) < p).astype(np.float32)
    if state.get("weight"):
        cols["weight"] = rng.uniform(0.5, 1.5, rows).astype(np.float32)
    cols["row_id"] = np.array([f"r{start_id + i:09d}" for i in range(rows)], dtype=object)
    return pa.table(cols)


def write_prepared(root: str, rows: dict[str, int], row_group_rows: int = 256, files: int | dict[str, int] = 2,
                   numeric: int = 4, categorical: int = 2, cardinality: int = 8,
                   positive_rate: float = 0.2, weight: bool = False, seed: int = 7,
                   versioned: bool = True, compression: str = "snappy") -> dict[str, Any]:
    """Write ``<root>/prepared`` (a symlink to a versioned directory when ``versioned``) with
    ``files`` Parquet files per split (an int, or one per split) of ``row_group_rows``-row row
    groups; returns the manifest."""
    state = feature_state(numeric, categorical, cardinality, weight=weight)
    version = "v-synthetic-" + str(seed)
    base = os.path.join(root, f".prepared-{version}" if versioned else "prepared")
    splits: dict[str, Any] = {}
    start = 0
    for i, (split, n) in enumerate(rows.items()):
        table = make_split(n, state, positive_rate, seed + i, start_id=start)
        start += n
        out = os.path.join(base, split)
        os.makedirs(out, exist_ok=True)
        n_files = files[split] if isinstance(files, dict) else files
        bounds = np.linspace(0, n, n_files + 1).astype(int)
        rg_sizes: list[int] = []
        nbytes = 0
        for f in range(n_files):
            part = table.slice(bounds[f], bounds[f + 1] - bounds[f])
            path = os.path.join(out, f"part-{f:05d}.parquet")
            pq.write_table(part, path, row_group_size=row_group_rows, compression=compression)
            md = pq.ParquetFile(path).metadata
            rg_sizes += [md.row_group(g).num_rows for g in range(md.num_row_groups)]
            nbytes += os.path.getsize(path)
        splits[split] = {
            "rows": n, "positives": int(table.column("label").to_numpy().sum()), "files": n_files,
            "row_groups": len(rg_sizes), "row_group_rows_min": min(rg_sizes),
            "row_group_rows_max": max(rg_sizes), "bytes": nbytes,
        }
    manifest = {"data_version": version, "config_hash": "synthetic",
                "counts": {"input": sum(rows.values()), "clean": sum(rows.values()), "quarantined": 0,
                           "duplicates": 0},
                "quarantine_reasons": {}, "splits": splits}
    with open(os.path.join(base, "feature_state.json"), "w") as f:
        json.dump(state, f, indent=2)
    with open(os.path.join(base, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    if versioned:
        link = os.path.join(root, "prepared")
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(os.path.basename(base), link)
    return manifest
