"""``run_prepare`` end to end: manifest, shards, PII, idempotency, atomic publish, determinism, Telco."""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from downpour import cli, storage
from downpour.config import Config, config_from_dict, load_config
from downpour.pipelines.ingest import list_input_files, pseudonym
from downpour.pipelines.prepare import compute_data_version, run_prepare
from downpour.pipelines.publish import Publisher, join

HEADER = ["Customer ID", "signup", "Monthly Charges", "plan", "email", "churned"]


def _rows() -> list[list[str]]:
    rows = []
    for i in range(240):
        h, d = (i * 3) % 24, (i * 3) // 24
        rows.append([f"C{i:04d}", f"2023-01-{1 + d:02d} {h:02d}:00:00", f"{20 + (i * 7) % 50}",
                     ["basic", "plus", "pro"][i % 3], f"user{i}@example.com", "Yes" if i % 4 == 0 else "No"])
    for i in (5, 50, 150):
        rows[i][2] = " "                       # blank charges: imputed by policy
    for i in (7, 77):
        rows[i][5] = "Maybe"                   # not in the label's domain
    rows += [["C0010", "2022-12-01 00:00:00", "99", "pro", "user10@example.com", "No"],   # older duplicates
             ["C0020", "2022-12-02 00:00:00", "98", "pro", "user20@example.com", "Yes"]]
    rows.append(["C9999", "2023-01-05 00:00:00", "1", "pro", "x@example.com", "No", "extra"])  # malformed
    return rows


def _raw_cfg(src: Path, out: Path) -> dict[str, Any]:
    return {
        "name": "tiny",
        "input": {"path": str(src), "format": "csv", "options": {"header": True}},
        "schema": {"Customer ID": "string", "signup": "timestamp", "Monthly Charges": "double", "plan": "string",
                   "email": "string", "churned": "string"},
        "id_column": "Customer ID",
        "timestamp_column": "signup",
        "label": {"column": "churned", "positive": "Yes"},
        "pii": {"drop": ["email"], "hash": ["Customer ID"]},
        "cleaning": {"nulls": {"Monthly Charges": {"action": "impute", "value": 0, "flag": True}},
                     "domains": {"churned": ["Yes", "No"]}},
        "split": {"method": "time", "column": "signup", "fractions": {"train": 0.7, "val": 0.15, "test": 0.15}},
        "features": {"numeric": ["Monthly Charges"], "categorical": ["plan"]},
        "shards": {"row_group_rows": 16, "min_row_groups_per_worker": 2},
        "training": {"workers": 2},
        "output": {"path": str(out)},
    }


@pytest.fixture(scope="module")
def tiny(spark, tmp_path_factory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("prepare")
    src = base / "raw" / "customers.csv"
    src.parent.mkdir()
    with src.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        w.writerows(_rows())
    cfg = config_from_dict(_raw_cfg(src, base / "out"))
    manifest = run_prepare(spark, cfg)
    return {"cfg": cfg, "manifest": manifest, "out": base / "out", "src": src, "base": base}


def _shard_checksums(prepared: Path, split: str) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((prepared / split).glob("*.parquet"))}


def test_manifest_counts_shards_and_no_pii(tiny):
    m, out = tiny["manifest"], tiny["out"]
    prepared = out / "prepared"
    assert prepared.is_symlink() and os.readlink(prepared).startswith(".versions/")
    on_disk = json.loads((prepared / "manifest.json").read_text())
    assert on_disk["data_version"] == m["data_version"] and on_disk["build"] == 1

    assert m["counts"] == {"input": 243, "clean": 238, "quarantined": 3, "duplicates": 2}
    assert m["invariant"]["holds"] and m["invariant"]["shard_rows"] == 238 and m["invariant"]["quarantine_rows"] == 3
    assert m["quarantine_reasons"] == {"not_in_domain:churned": 2, "malformed": 1}
    assert m["cleaning"]["imputed"] == {"Monthly Charges": 3}
    assert set(m["timings"]) >= {"ingest_clean", "quarantine", "split", "fit_features", "shards", "publish"}
    assert m["split"]["method"] == "time" and m["feature_state"].endswith("feature_state.json")

    k = 2 * 2
    assert sum(s["rows"] for s in m["splits"].values()) == 238
    for name, s in m["splits"].items():
        assert s["row_groups"] >= k and s["files"] == s["row_groups"]
        assert s["checksums"] == _shard_checksums(prepared, name)
        groups = [pq.ParquetFile(prepared / name / f).metadata.row_group(0).num_rows for f in s["checksums"]]
        body = sorted(groups)[1:]
        assert sum(groups) == s["rows"] and max(body) / min(body) <= 1.25
        assert s["row_group_rows_max"] <= 16
        assert pq.read_table(prepared / name).column("label").to_pylist().count(1.0) == s["positives"]
    # time split: every train customer signed up before every val customer, and val before test
    # (customer i signed up at hour 3i, so the index is the time order; ids are pseudonyms in the shards)
    index = {pseudonym(f"C{i:04d}", "test-salt"): i for i in range(240)}
    order = {s: sorted(index[r] for r in pq.read_table(prepared / s).column("row_id").to_pylist())
             for s in ("train", "val", "test")}
    assert all(order.values()) and sum(map(len, order.values())) == 238
    assert order["train"][-1] < order["val"][0] and order["val"][-1] < order["test"][0], \
        {s: (o[0], o[-1]) for s, o in order.items()}
    q = pq.read_table(prepared / "quarantine").to_pylist()
    assert {r["reason"] for r in q} == {"not_in_domain:churned", "malformed"}
    (bad,) = [r for r in q if r["reason"] == "malformed"]
    assert bad["line_number"] == 244 and bad["source_file"].endswith("customers.csv")  # header + 243 rows

    raw_ids = [f"C{i:04d}" for i in range(240)]
    texts = [(prepared / "manifest.json").read_text(), (prepared / "feature_state.json").read_text(),
             json.dumps(q, default=str)]
    texts += [json.dumps(pq.read_table(prepared / s).to_pylist(), default=str) for s in ("train", "val", "test")]
    for text in texts:
        assert "@example.com" not in text
        assert not any(i in text for i in raw_ids[:50])
    train_ids = set(pq.read_table(prepared / "train").column("row_id").to_pylist())
    # HMAC-SHA256 keyed by the salt (from conftest), by the standard library
    assert hmac.new(b"test-salt", b"C0003", hashlib.sha256).hexdigest() in train_ids
    assert hashlib.sha256(b"test-saltC0003").hexdigest() not in train_ids


def test_data_version_follows_input_config_and_salt(spark, tiny, monkeypatch):
    cfg: Config = tiny["cfg"]
    files = list_input_files(spark, cfg.input.path)
    dv = compute_data_version(files, cfg, "test-salt")
    assert dv == tiny["manifest"]["data_version"] == compute_data_version(files, cfg, "test-salt")
    assert compute_data_version(files, cfg, "other-salt") != dv
    changed = config_from_dict({**_raw_cfg(tiny["src"], tiny["out"]), "shards": {"row_group_rows": 32}})
    assert compute_data_version(files, changed, "test-salt") != dv
    st = os.stat(tiny["src"])
    os.utime(tiny["src"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert compute_data_version(list_input_files(spark, cfg.input.path), cfg, "test-salt") != dv
    finally:
        os.utime(tiny["src"], ns=(st.st_atime_ns, st.st_mtime_ns))


def test_break_the_input_fingerprint_and_the_version_test_fails(spark, tiny, monkeypatch):
    """Companion: a data version blind to the input files would make a changed input a silent no-op."""
    import downpour.pipelines.prepare as prep

    monkeypatch.setattr(prep, "input_fingerprint", lambda files: "the same whatever the files")
    with pytest.raises(AssertionError):
        test_data_version_follows_input_config_and_salt(spark, tiny, monkeypatch)


def test_rerun_is_a_noop(spark, tiny):
    versions = sorted(os.listdir(tiny["out"] / ".versions"))
    again = run_prepare(spark, tiny["cfg"])
    assert again == json.loads((tiny["out"] / "prepared" / "manifest.json").read_text())
    assert again["build"] == tiny["manifest"]["build"] and again["created_at"] == tiny["manifest"]["created_at"]
    assert sorted(os.listdir(tiny["out"] / ".versions")) == versions


def test_crash_in_publish_keeps_previous_version_then_force_rebuilds_identically(spark, tiny, monkeypatch):
    out, first = tiny["out"], tiny["manifest"]
    prepared = out / "prepared"

    def crash(link, target, legacy_dir):  # the process dies right before the pointer swap, without cleaning up
        raise RuntimeError("simulated crash during publish")

    monkeypatch.setattr(storage, "swap_symlink", crash)
    monkeypatch.setattr(Publisher, "abort", lambda self, staging: None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_prepare(spark, tiny["cfg"], force=True)
    still = json.loads((prepared / "manifest.json").read_text())
    assert (still["data_version"], still["build"]) == (first["data_version"], first["build"])
    assert pq.read_table(prepared / "train").num_rows == first["splits"]["train"]["rows"]
    assert _shard_checksums(prepared, "train") == first["splits"]["train"]["checksums"]
    leftovers = set(os.listdir(out / ".versions")) - {os.path.basename(os.readlink(prepared))}
    assert leftovers  # the crashed build is there, but nothing points at it

    monkeypatch.undo()
    rebuilt = run_prepare(spark, tiny["cfg"], force=True)
    assert rebuilt["data_version"] == first["data_version"] and rebuilt["build"] > first["build"]
    assert os.readlink(prepared).endswith(f"-{rebuilt['build']}")
    for s in ("train", "val", "test"):  # byte-identical shards from the same input, config and seed
        assert rebuilt["splits"][s]["checksums"] == first["splits"][s]["checksums"]
    assert rebuilt["splits"]["train"]["checksums"] == _shard_checksums(prepared, "train")
    # the crashed build is gone; the replaced version is kept for readers that still hold it
    assert sorted(os.listdir(out / ".versions")) == sorted(
        [f"{first['data_version']}-{first['build']}", f"{first['data_version']}-{rebuilt['build']}"])


def test_publish_by_rename_where_there_are_no_symlinks(spark, tmp_path):
    """hdfs://, s3a://, dbfs:/ take the Hadoop-rename path; exercised here through file: URLs."""
    pub = Publisher(spark, str(tmp_path))
    pub.local = False
    for build in (1, 2):
        staging = pub.stage("dv")
        pub.fs.write_bytes(join(staging.url, "train", "part-00000.parquet"), b"x" * build)
        assert pub.final_url(staging) == pub.prepared and staging.build == build
        assert pub.current_manifest() is None or pub.current_manifest()["build"] == build - 1
        pub.commit(staging, {"data_version": "dv", "build": staging.build})
        assert pub.current_manifest() == {"data_version": "dv", "build": build}
    prepared = tmp_path / "prepared"
    assert prepared.is_dir() and not prepared.is_symlink()
    assert (prepared / "train" / "part-00000.parquet").read_bytes() == b"xx"
    assert os.listdir(tmp_path / ".versions") == []  # staging and retired versions are gone


def test_cli_exit_code_3_names_missing_column_and_file(spark, tmp_path, capsys):
    src = tmp_path / "bad.csv"
    src.write_text("Customer ID,signup,plan,email,churned\nC1,2023-01-01 00:00:00,pro,a@example.com,No\n")
    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml.safe_dump(_raw_cfg(src, tmp_path / "out")))
    assert cli.main(["prepare", "--conf", str(conf)]) == 3
    err = capsys.readouterr().err
    assert "'Monthly Charges'" in err and "bad.csv" in err and "Traceback" not in err


@pytest.mark.slow
def test_real_telco_table_end_to_end(spark, telco_path, conf_dir, tmp_path):
    cfg = load_config(conf_dir / "crm_telco.yaml", [f"input.path={telco_path}", f"output.path={tmp_path}"])
    m = run_prepare(spark, cfg)
    assert m["counts"] == {"input": 7043, "clean": 7043, "quarantined": 0, "duplicates": 0}
    assert m["invariant"]["holds"] and m["invariant"]["shard_rows"] == 7043
    assert m["cleaning"]["imputed"] == {"TotalCharges": 11}
    assert m["labels"]["positives"] == 1869
    k = cfg.shards.min_row_groups_per_worker * cfg.training.workers
    for s in m["splits"].values():
        assert s["row_groups"] >= k and s["row_group_rows_max"] <= cfg.shards.row_group_rows
    text = (tmp_path / "prepared" / "manifest.json").read_text()
    ids = pq.read_table(tmp_path / "prepared" / "train", columns=["row_id"]).column("row_id").to_pylist()
    assert "7590-VHVEG" not in text and "7590-VHVEG" not in ids and all(len(i) == 64 for i in ids)


def _prepare_stage_tasks(spark, cfg: Config, group: str) -> list[int]:
    """Run prepare with 64 shuffle partitions (as a cluster session's 200 would be) and return the task
    count of every stage it ran, read from Spark's status tracker."""
    sc = spark.sparkContext
    before = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", "64")
    sc.setJobGroup(group, "prepare stage sizes")
    try:
        run_prepare(spark, cfg)
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
        spark.conf.set("spark.sql.shuffle.partitions", before)
    tracker = sc.statusTracker()
    stages = [s for j in tracker.getJobIdsForGroup(group) for s in (tracker.getJobInfo(j).stageIds or [])]
    return [info.numTasks for info in map(tracker.getStageInfo, stages) if info is not None]


def test_persisted_frames_are_sized_to_the_input_not_to_shuffle_partitions(spark, tiny):
    """AQE does not merge the partitions of a persisted frame: without sizing, every pass over prepare's
    cached frames of a 245-row input runs one task per shuffle partition (64 here, 200 on a cluster).
    With it no stage runs that many, and the shards are byte-identical to the 4-partition run's."""
    cfg = config_from_dict(_raw_cfg(tiny["src"], tiny["base"] / "sized"))
    tasks = _prepare_stage_tasks(spark, cfg, "sized")
    assert tasks and max(tasks) < 64, tasks
    for split in ("train", "val", "test"):
        assert _shard_checksums(tiny["base"] / "sized" / "prepared", split) == \
            _shard_checksums(tiny["out"] / "prepared", split)


def test_without_sizing_prepare_runs_a_task_per_shuffle_partition(spark, tiny, monkeypatch):
    """The companion: with the sizing disabled, stages of 64 tasks come back, so the test above can fail."""
    import downpour.pipelines.prepare as prepare

    monkeypatch.setattr(prepare, "sized_partitions", lambda spark, files, fmt: 10**6)
    cfg = config_from_dict(_raw_cfg(tiny["src"], tiny["base"] / "unsized"))
    assert 64 in _prepare_stage_tasks(spark, cfg, "unsized")


def test_prepare_scans_its_input_under_the_split_settings(spark, tiny, monkeypatch):
    """The ingest pass and the independent count run under ``ingest.split_settings`` (a marker value here),
    and the session's own value comes back when the stage ends."""
    import downpour.pipelines.prepare as prepare
    from downpour.spark import MAX_SPLIT_KEY

    seen: list[str | None] = []
    real_rows, real_count = prepare.tagged_rows, prepare.count_input_records
    monkeypatch.setattr(prepare, "split_settings", lambda spark, cfg, files: {MAX_SPLIT_KEY: "1234567"})
    monkeypatch.setattr(prepare, "tagged_rows", lambda *a, **k: seen.append(spark.conf.get(MAX_SPLIT_KEY, None))
                        or real_rows(*a, **k))
    monkeypatch.setattr(prepare, "count_input_records", lambda *a, **k: seen.append(
        spark.conf.get(MAX_SPLIT_KEY, None)) or real_count(*a, **k))
    before = spark.conf.get(MAX_SPLIT_KEY, None)
    run_prepare(spark, config_from_dict(_raw_cfg(tiny["src"], tiny["base"] / "split")))
    assert seen == ["1234567", "1234567"]
    assert spark.conf.get(MAX_SPLIT_KEY, None) == before


def test_prepare_computes_the_fit_s_and_the_drift_s_quantiles_in_one_go(spark, tiny, monkeypatch):
    """The feature fit and the drift reference read one exact quantile table of the train rows: one
    computation holds the fit's median and the drift's deciles, none computes either alone, and it reads
    the train split's rows only (as many as the train shards hold)."""
    from downpour.features import drift, exact

    calls: list[tuple[list[float], int]] = []
    real = exact.quantiles
    monkeypatch.setattr(exact, "quantiles", lambda df, columns, probs: calls.append((list(probs), df.count()))
                        or real(df, columns, probs))
    m = run_prepare(spark, config_from_dict(_raw_cfg(tiny["src"], tiny["base"] / "shared")))
    fit_or_drift = [(p, n) for p, n in calls if 1.0 in p or set(drift.DECILES) <= set(p)]
    assert len(fit_or_drift) == 1 and {0.0, 0.5, 1.0, *drift.DECILES} <= set(fit_or_drift[0][0]), calls
    assert fit_or_drift[0][1] == m["splits"]["train"]["rows"] < sum(s["rows"] for s in m["splits"].values())


def test_partitions_follow_the_estimated_rows_of_the_input(spark):
    from types import SimpleNamespace as File

    from downpour.spark import sized_partitions

    floor = spark.sparkContext.defaultParallelism
    assert sized_partitions(spark, [File(path="s3a://b/t.csv", size=1 << 20)], "csv") == floor
    gib = 1 << 30
    assert sized_partitions(spark, [File(path="/d/t.csv", size=gib)], "csv") == 32  # 2 GiB / 64 MiB
    assert sized_partitions(spark, [File(path="/d/t.csv.gz", size=gib)], "csv") == 64  # decoded grows more
    assert sized_partitions(spark, [File(path="/d/p", size=gib)] * 2, "parquet") == 128
    # 13 advisory sizes of rows: rounded up to whole waves of the cores (4 in this session), not 13
    assert floor == 4
    assert sized_partitions(spark, [File(path="/d/t.csv", size=13 * (32 << 20))], "csv") == 16


def _prepare_failing_after_both_persists(spark, tiny, monkeypatch, name: str) -> bool:
    """Run prepare with a failure injected once both its frames are persisted (the tagged rows and the
    windowed rows, before their first action); True if the session holds no cached frame afterwards."""
    import downpour.pipelines.prepare as prepare

    def split_counts(frame):
        raise RuntimeError("injected after the windowed rows were persisted")

    monkeypatch.setattr(prepare, "split_counts", split_counts)
    spark.catalog.clearCache()
    cfg = config_from_dict(_raw_cfg(tiny["src"], tiny["base"] / name))
    with pytest.raises(RuntimeError, match="injected"):
        run_prepare(spark, cfg)
    empty = spark._jsparkSession.sharedState().cacheManager().isEmpty()
    spark.catalog.clearCache()
    return bool(empty)


def test_prepare_bounds_the_hot_key_count_by_its_clean_rows(spark, tiny, monkeypatch):
    """The windows' hot-key count gets the clean rows counted by the ingest pass as its bound."""
    from downpour.features import windows

    bounds: list[int | None] = []
    count_hot = windows._hot_keys
    monkeypatch.setattr(windows, "_hot_keys", lambda df, plans, rows=None, **kw: bounds.append(rows) or
                        count_hot(df, plans, rows, **kw))
    raw = _raw_cfg(tiny["src"], tiny["base"] / "velocity")
    raw["features"]["velocity"] = {"enabled": True, "entities": ["Customer ID"], "windows": ["7d"]}
    manifest = run_prepare(spark, config_from_dict(raw))
    assert bounds == [manifest["counts"]["clean"]] and bounds[0] > 0


def test_a_failing_prepare_releases_the_frames_it_persisted(spark, tiny, monkeypatch):
    """A long-lived session (a notebook, a scheduler's driver) must not keep a failed run's blocks."""
    assert _prepare_failing_after_both_persists(spark, tiny, monkeypatch, "failing")


def test_without_the_stage_release_a_failing_prepare_leaves_its_frames(spark, tiny, monkeypatch):
    """The companion: with the stage's release disabled the check above sees the frames left behind."""
    from downpour.spark import Persisted

    monkeypatch.setattr(Persisted, "_release_all", lambda self: None)
    assert not _prepare_failing_after_both_persists(spark, tiny, monkeypatch, "leaking")
