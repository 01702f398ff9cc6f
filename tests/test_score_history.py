"""`downpour score` with entity history, end to end on generated data with real trained models.

Fraud (velocity) and CRM (RFM): prepare and train on the early part of the data, then score the late
part as a brand-new file. With the model's history its scores equal scoring early + late together;
without it they do not (the skew the history prevents). The fraud model also shows: evaluation parity
on its own test split (the test rows as a new file, the earlier rows as --history), a two-day roll
forward with --history-out, the gap limit (exit 3) and the explicit --no-history.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from downpour.errors import ConfigError, DataContractError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _generated(spark, kind: str, rows: int, out: Path) -> pd.DataFrame:
    from downpour.pipelines.generate import generate, write_raw

    write_raw(generate(spark, kind, rows=rows, seed=11), str(out), fmt="csv", partitions=1, rows=rows)
    return pd.concat([pd.read_csv(f, dtype=str, keep_default_na=False) for f in sorted(out.glob("*.csv"))])


def _train(spark, conf: str, data: Path, out: Path, extra: list[str]):
    from downpour.config import load_config
    from downpour.pipelines.prepare import run_prepare
    from downpour.training.train import run_training

    cfg = load_config(ROOT / "conf" / conf, [
        f"input.path={data}", f"output.path={out}", "training.epochs=1", "training.workers=1",
        "shards.row_group_rows=64", "evaluation.baseline=false", *extra])
    run_prepare(spark, cfg)
    run_training(spark, cfg)
    return cfg


def _score(spark, cfg, rows: pd.DataFrame, where: Path, name: str, **kw) -> pd.DataFrame:
    from downpour.pipelines.score import run_scoring

    src = where / f"{name}.csv"
    rows.to_csv(src, index=False)
    res = run_scoring(spark, cfg, str(src), str(where / f"{name}_scores"), **kw)
    assert res["scored"] == len(rows)
    return pd.read_parquet(where / f"{name}_scores")


def _close(a: pd.DataFrame, b: pd.DataFrame, key: str, atol: float = 1e-6) -> pd.DataFrame:
    j = a.merge(b, on=key, suffixes=("_a", "_b"))
    assert len(j) == len(a) == len(b)
    np.testing.assert_allclose(j["score_a"], j["score_b"], atol=atol, rtol=0)
    return j


def _differs(a: pd.DataFrame, b: pd.DataFrame, key: str) -> int:
    j = a.merge(b, on=key, suffixes=("_a", "_b"))
    return int((np.abs(j["score_a"] - j["score_b"]) > 1e-6).sum())


@pytest.fixture(scope="module")
def fraud(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fraud_history")
    raw = _generated(spark, "fraud", 8000, tmp / "gen")
    raw = raw.sort_values(["event_ts", "transaction_id"]).reset_index(drop=True)
    cut = raw["event_ts"].iloc[int(len(raw) * 0.85)]
    early, late = raw[raw["event_ts"] < cut], raw[raw["event_ts"] >= cut]
    early.to_csv(tmp / "early.csv", index=False)
    cfg = _train(spark, "fraud.yaml", tmp / "early.csv", tmp / "out", [])
    return cfg, tmp, raw, early, late.drop(columns=["is_fraud"])


@pytest.fixture(scope="module")
def fraud_together(spark, fraud) -> pd.DataFrame:
    """The reference: the late rows' scores when early and late are scored together as one file."""
    cfg, tmp, raw, early, late = fraud
    together = _score(spark, cfg, pd.concat([early.drop(columns=["is_fraud"]), late]), tmp, "all",
                      no_history=True)
    return together[together["transaction_id"].isin(late["transaction_id"])]


def test_fraud_new_file_scored_with_history_equals_scoring_it_with_its_past(spark, fraud, fraud_together,
                                                                              monkeypatch):
    from downpour.features import windows

    cfg, tmp, raw, early, late = fraud
    together = fraud_together
    bounds: list[int | None] = []
    count_hot = windows._hot_keys
    monkeypatch.setattr(windows, "_hot_keys", lambda df, plans, rows=None, **kw: bounds.append(rows) or
                        count_hot(df, plans, rows, **kw))
    with_history = _score(spark, cfg, late, tmp, "late")
    _close(with_history, together, "transaction_id")
    summary = json.loads((tmp / "late_scores_summary.json").read_text())
    assert summary["history"]["sources"][0]["kind"] == "model" and summary["history"]["gap_seconds"] >= 0
    # the hot-key count is bounded by rows already counted: the clean input rows (none failed in the model,
    # so they are the scored ones) and the history's
    assert bounds == [summary["scored"] + sum(s["rows"] for s in summary["history"]["sources"])]

    alone = _score(spark, cfg, late, tmp, "late_alone", no_history=True)
    assert _differs(alone, together, "transaction_id") > len(late) * 0.05, "without history the scores differ"


def test_fraud_test_split_scored_as_new_file_equals_the_evaluation(spark, fraud):
    from downpour.training.evaluate import run_evaluation

    cfg, tmp, raw, early, late = fraud
    res = run_evaluation(spark, cfg)
    ev = pd.read_parquet(Path(res["scores"]) / "split=test")[["row_id", "score"]]
    test_rows = early[early["transaction_id"].isin(ev["row_id"])].drop(columns=["is_fraud"])
    before = early[~early["transaction_id"].isin(ev["row_id"])]
    assert len(test_rows) == len(ev) > 300
    before.drop(columns=["is_fraud"]).to_csv(tmp / "before_test.csv", index=False)
    scored = _score(spark, cfg, test_rows, tmp, "test_rows", history=[str(tmp / "before_test.csv")])
    _close(scored.rename(columns={"transaction_id": "row_id"}), ev, "row_id")
    alone = _score(spark, cfg, test_rows, tmp, "test_rows_alone", no_history=True)
    assert _differs(alone.rename(columns={"transaction_id": "row_id"}), ev, "row_id") > 0


def test_fraud_two_days_rolled_forward_equal_both_days_together(spark, fraud, fraud_together):
    """Day 1 publishes its history (--history-out), day 2 reads it as a store and rolls it on: day 2's
    scores equal those of everything scored together as one file, and scoring day 2 once more against
    the rolled-on store (a new champion re-scoring the last day) gives them again."""
    cfg, tmp, raw, early, late = fraud
    mid = late["event_ts"].iloc[len(late) // 2]
    day1, day2 = late[late["event_ts"] < mid], late[late["event_ts"] >= mid]
    store = tmp / "store" / "history"
    _score(spark, cfg, day1, tmp, "day1", history_out=str(store))
    assert (store / "_history.json").exists() and store.is_symlink()
    second = _score(spark, cfg, day2, tmp, "day2", history_store=str(store))
    _close(second, fraud_together[fraud_together["transaction_id"].isin(day2["transaction_id"])], "transaction_id")
    # a new champion re-scores day 2 against the store that already holds it: the same history again
    again = _score(spark, cfg, day2, tmp, "day2_again", history_store=str(store))
    _close(again, second, "transaction_id")
    meta = json.loads((store / "_history.json").read_text())
    assert meta["end"] == pd.Timestamp(day2["event_ts"].max()).strftime("%Y-%m-%dT%H:%M:%SZ")
    summary = json.loads((tmp / "day2_again_scores_summary.json").read_text())["history"]
    assert [s["kind"] for s in summary["sources"]] == ["model", "store"] and summary["written"]["rows"] == meta["rows"]
    assert summary["overlap_seconds"] > 0


def test_fraud_gap_limit_and_explicit_no_history(spark, fraud, tmp_path):
    from downpour.pipelines.score import run_scoring

    cfg, tmp, raw, early, late = fraud
    day2 = late[late["event_ts"] >= late["event_ts"].iloc[len(late) // 2]]
    src = tmp_path / "day2.csv"
    day2.to_csv(src, index=False)
    strict = cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update={"max_history_gap": "1m"})})
    with pytest.raises(DataContractError, match="max_history_gap=1m") as err:
        run_scoring(spark, strict, str(src), str(tmp_path / "s"))
    assert err.value.exit_code == 3 and not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="--no-history"):
        run_scoring(spark, cfg, str(src), str(tmp_path / "s"), no_history=True, history=[str(src)])
    with pytest.raises(ConfigError, match="--history-out"):
        run_scoring(spark, cfg, str(src), str(tmp_path / "s"), history_out=str(tmp_path / "a"),
                    history_store=str(tmp_path / "b"))
    data = tmp_path / "not_a_history"
    data.mkdir()
    (data / "keep.csv").write_text("precious\n")
    for flag in ("history_out", "history_store"):  # a mistyped store never replaces a directory
        with pytest.raises(ConfigError, match="not an entity history"):
            run_scoring(spark, cfg, str(src), str(tmp_path / "s"), **{flag: str(data)})
    assert (data / "keep.csv").read_text() == "precious\n"

    # a model without its history, and no prepared data of its version: an error unless --no-history
    bare = tmp_path / "bare_model"
    shutil.copytree(Path(cfg.output.path) / "model", bare, symlinks=False)
    shutil.rmtree(bare / "entity_history")
    elsewhere = cfg.model_copy(update={"output": cfg.output.model_copy(update={"path": str(tmp_path / "none")})})
    with pytest.raises(DataContractError, match="no entity history was found"):
        run_scoring(spark, elsewhere, str(src), str(tmp_path / "s"), model_dir=str(bare))
    res = run_scoring(spark, elsewhere, str(src), str(tmp_path / "s"), model_dir=str(bare), no_history=True)
    assert res["scored"] == len(day2) and res["history"]["disabled"]


def test_scoring_builds_its_caches_inside_the_persisting_scope(spark, fraud, tmp_path, monkeypatch):
    from downpour.pipelines import score as score_mod
    from downpour.spark import CACHE_COMPRESSED_KEY

    cfg, tmp, raw, early, late = fraud
    seen: list[str] = []
    real_serve = score_mod._serve

    def serve(*args, **kwargs):  # between the input batch's first action (_ingest) and the scores' (inside)
        seen.append(spark.conf.get(CACHE_COMPRESSED_KEY))
        out = real_serve(*args, **kwargs)
        seen.append(spark.conf.get(CACHE_COMPRESSED_KEY))
        return out

    monkeypatch.setattr(score_mod, "_serve", serve)
    spark.conf.set(CACHE_COMPRESSED_KEY, "true")
    try:
        _score(spark, cfg, late.head(200), tmp_path, "scoped", no_history=True)
        assert seen == ["false", "false"] and spark.conf.get(CACHE_COMPRESSED_KEY) == "true"
    finally:
        spark.conf.unset(CACHE_COMPRESSED_KEY)


def _score_failing_after_the_scores_persist(spark, fraud, tmp_path, monkeypatch, name: str) -> bool:
    """Score with a failure injected inside ``_serve`` once the scores are persisted (the input batch is
    too); True if the session holds no cached frame afterwards."""
    from downpour.pipelines import score as score_mod

    def explained(*args, **kwargs):
        raise RuntimeError("injected after the scores were persisted")

    cfg, tmp, raw, early, late = fraud
    monkeypatch.setattr(score_mod, "_explained", explained)
    spark.catalog.clearCache()
    with pytest.raises(RuntimeError, match="injected"):
        _score(spark, cfg, late.head(200), tmp_path, name)
    empty = spark._jsparkSession.sharedState().cacheManager().isEmpty()
    spark.catalog.clearCache()
    return bool(empty)


def test_a_failing_scoring_run_releases_the_frames_it_persisted(spark, fraud, tmp_path, monkeypatch):
    assert _score_failing_after_the_scores_persist(spark, fraud, tmp_path, monkeypatch, "failing")


def test_without_the_stage_release_a_failing_scoring_run_leaves_its_frames(spark, fraud, tmp_path, monkeypatch):
    """The companion: with the stage's release disabled the check above sees the frames left behind."""
    from downpour.spark import Persisted

    monkeypatch.setattr(Persisted, "_release_all", lambda self: None)
    assert not _score_failing_after_the_scores_persist(spark, fraud, tmp_path, monkeypatch, "leaking")


def _rescore_failing_in_the_accounting(spark, fraud, tmp_path, monkeypatch) -> tuple[tuple, tuple]:
    """Score 200 rows, then 200 other rows into the same output with the record count off by one (the
    row accounting fails); what a reader sees at the output before and after the failed run."""
    from downpour.pipelines import score as score_mod

    cfg, tmp, raw, early, late = fraud
    _score(spark, cfg, late.head(200), tmp_path, "daily")
    out = tmp_path / "daily_scores"

    def published() -> tuple:
        return (pd.read_parquet(out).sort_values("transaction_id").to_dict("records"),
                len(pd.read_parquet(f"{out}_quarantine")), Path(f"{out}_summary.json").read_text())

    before = published()
    real = score_mod.count_input_records
    monkeypatch.setattr(score_mod, "count_input_records", lambda *a: real(*a) + 1)
    with pytest.raises(RuntimeError, match="row accounting broken"):
        _score(spark, cfg, late.iloc[200:400], tmp_path, "daily")
    return before, published()


@pytest.mark.parametrize("symlinks", [True, False], ids=["symlink-swap", "renames"])
def test_a_failing_scoring_run_leaves_the_previous_outputs_as_they_were(spark, fraud, tmp_path, monkeypatch,
                                                                         symlinks):
    """Scores and quarantine are staged and published only once every row is accounted for, the summary
    last: a failed run over yesterday's output leaves it whole and no staging behind, whether published
    by a symlink swap (local disks) or by renames (every other file system)."""
    from downpour.pipelines import score_outputs

    monkeypatch.setattr(score_outputs, "has_symlinks", lambda url: symlinks)
    before, after = _rescore_failing_in_the_accounting(spark, fraud, tmp_path, monkeypatch)
    assert after == before
    assert (tmp_path / "daily_scores").is_symlink() == symlinks
    assert not list(tmp_path.rglob(".staging-*")) and not list(tmp_path.rglob(".retired-*"))


def test_without_the_staging_a_failing_scoring_run_replaces_the_previous_outputs(spark, fraud, tmp_path,
                                                                                 monkeypatch):
    """The companion: scores written straight to ``--output`` (no staging, no publish) let the failed run
    replace the previous scores, which the check above sees."""
    from downpour.pipelines.score_outputs import ScoreOutputs

    monkeypatch.setattr(ScoreOutputs, "staged", lambda self, name: self._final[name])
    monkeypatch.setattr(ScoreOutputs, "publish", lambda self: None)
    before, after = _rescore_failing_in_the_accounting(spark, fraud, tmp_path, monkeypatch)
    assert after[0] != before[0]


def test_crm_new_months_scored_with_history_equal_scoring_them_with_their_past(spark, tmp_path):
    raw = _generated(spark, "crm", 6000, tmp_path / "gen")
    months = sorted(raw["snapshot_date"].unique())
    cut = months[-3]
    early, late = raw[raw["snapshot_date"] < cut], raw[raw["snapshot_date"] >= cut].drop(columns=["churned"])
    early.to_csv(tmp_path / "early.csv", index=False)
    cfg = _train(spark, "crm.yaml", tmp_path / "early.csv", tmp_path / "out", [])
    with_history = _score(spark, cfg, late, tmp_path, "late")
    together = _score(spark, cfg, pd.concat([early.drop(columns=["churned"]), late]), tmp_path, "all",
                      no_history=True)
    key = "row_id"
    _close(with_history, together[together[key].isin(with_history[key])], key)
    alone = _score(spark, cfg, late, tmp_path, "alone", no_history=True)
    assert _differs(alone, together, key) > len(late) * 0.05


def test_the_content_key_tells_rows_apart_by_where_their_nulls_are(spark):
    """A failed row finds its raw values by this key: rows that differ only in which field is null must
    not share it (the companion: a plain struct hash, which skips nulls, does)."""
    from pyspark.sql import functions as F

    from downpour.pipelines.score import content_key

    df = spark.createDataFrame([("5", None, "f"), (None, "5", "f"), ("5", None, "f")], "a string, b string, src string")
    df = df.select(F.struct("a", "b").alias("raw"), "src")
    keys = [r[0] for r in df.select(content_key("raw", df.schema["raw"].dataType, "src")).collect()]
    assert keys[0] != keys[1] and keys[0] == keys[2]
    plain = [r[0] for r in df.select(F.xxhash64("raw", "src")).collect()]
    assert plain[0] == plain[1]


def test_scoring_scans_its_input_under_the_split_settings(spark, fraud, tmp_path, monkeypatch):
    """The ingest pass and the independent count both run under ``ingest.split_settings`` (a marker value
    here), and the session's own value comes back when the stage ends."""
    from downpour.pipelines import score as score_mod
    from downpour.spark import MAX_SPLIT_KEY

    cfg, tmp, raw, early, late = fraud
    seen: list[str | None] = []
    real_ingest, real_count = score_mod._ingest, score_mod.count_input_records
    monkeypatch.setattr(score_mod, "split_settings", lambda spark, cfg, files: {MAX_SPLIT_KEY: "1234567"})
    monkeypatch.setattr(score_mod, "_ingest", lambda *a, **k: seen.append(spark.conf.get(MAX_SPLIT_KEY, None))
                        or real_ingest(*a, **k))
    monkeypatch.setattr(score_mod, "count_input_records", lambda *a, **k: seen.append(
        spark.conf.get(MAX_SPLIT_KEY, None)) or real_count(*a, **k))
    before = spark.conf.get(MAX_SPLIT_KEY, None)
    _score(spark, cfg, late.head(200), tmp_path, "split", no_history=True)
    assert seen == ["1234567", "1234567"]
    assert spark.conf.get(MAX_SPLIT_KEY, None) == before


def _columns_scoring_carries(spark, fraud, tmp_path, monkeypatch) -> set[str]:
    """Score 200 rows with history; the columns handed to the windows."""
    from downpour.features import windows

    cfg, tmp, raw, early, late = fraud
    seen: dict[str, set[str]] = {}
    real_windows = windows.add_window_features

    def add(df, *a, **k):
        seen["windows"] = set(df.columns)
        return real_windows(df, *a, **k)

    monkeypatch.setattr(windows, "add_window_features", add)
    _score(spark, cfg, late.head(200), tmp_path, "narrow")
    return seen["windows"]


def _read_by_windows_or_model(cfg, model_dir: Path) -> set[str]:
    """What the windows and the model read, from the config and the model's own signature (not from the
    code under test): the event time, the window entities and values, the serving inputs."""
    from downpour.artifact import RAW_SIGNATURE
    from downpour.pipelines.serving import signature_inputs

    v = cfg.features.velocity
    raw = [cfg.timestamp_column, *v.entities, v.amount_column, v.device_column, v.country_column]
    return {cfg.names[c] for c in raw if c} | set(signature_inputs(str(model_dir / "saved_model"), RAW_SIGNATURE))


def test_scoring_shuffles_only_the_columns_the_windows_and_the_model_read(spark, fraud, tmp_path, monkeypatch):
    """The window shuffles and sorts carry each column they are handed: scoring hands them the ids, the
    history marker and what the windows and the model read."""
    from downpour.features.history import CONTEXT

    cfg = fraud[0]
    windowed = _columns_scoring_carries(spark, fraud, tmp_path, monkeypatch)
    assert windowed - _read_by_windows_or_model(cfg, Path(cfg.output.path) / "model") == {"__id", "_dp_rid", CONTEXT}


def test_without_the_narrowing_the_windows_get_columns_nobody_reads(spark, fraud, tmp_path, monkeypatch):
    """The companion: handing the windows every clean column is what the check above catches."""
    from downpour.pipelines import score as score_mod

    monkeypatch.setattr(score_mod, "_served_columns", lambda events, full, model: events)
    cfg = fraud[0]
    windowed = _columns_scoring_carries(spark, fraud, tmp_path, monkeypatch)
    extra = windowed - _read_by_windows_or_model(cfg, Path(cfg.output.path) / "model")
    assert {"_dp_reason", "_dp_stage", "_dp_line_hash"} <= extra


def test_a_missing_flag_on_the_label_does_not_stop_scoring(spark, fraud, tmp_path):
    """Scoring reads no label: a null policy that flags the label's nulls makes a flag from the placeholder
    label, and the narrowed rows must keep the label beside that flag (``serving_nulls`` reads both); the
    scores are those of the plain config."""
    from downpour.config import NullPolicy

    cfg, tmp, raw, early, late = fraud
    nulls = {**cfg.cleaning.nulls, "is_fraud": NullPolicy(action="impute", value=0, flag=True)}
    flagged = cfg.model_copy(update={"cleaning": cfg.cleaning.model_copy(update={"nulls": nulls})})
    rows = late.head(200)
    _close(_score(spark, flagged, rows, tmp_path, "label_flag"), _score(spark, cfg, rows, tmp_path, "plain"),
           "transaction_id")
