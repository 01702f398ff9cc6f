"""Ingest + clean: the data contract, every quarantine reason, PII in quarantine, the row invariant."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyspark.sql import functions as F

from downpour.config import Config, config_from_dict
from downpour.errors import ConfigError, DataContractError
from downpour.pipelines import clean
from downpour.pipelines.ingest import RAW, ROW_HASH, SOURCE, contract_errors, list_input_files, pseudonym
from downpour.pipelines.prepare import account, malformed_lines, run_prepare
from downpour.pipelines.rows import split_rows, tagged_rows

HEADER = ["txn id", "event_ts", "Amount (EUR)", "country", "email", "is_fraud"]
SCHEMA = {"txn id": "string", "event_ts": "timestamp", "Amount (EUR)": "double", "country": "string",
          "email": "string", "is_fraud": "int"}


def make_cfg(input_path: Path | str, out: Path | str, fmt: str = "csv", **extra: Any) -> Config:
    raw: dict[str, Any] = {
        "name": "t",
        "input": {"path": str(input_path), "format": fmt, "options": {"header": True} if fmt == "csv" else {}},
        "schema": SCHEMA,
        "id_column": "txn id",
        "timestamp_column": "event_ts",
        "label": {"column": "is_fraud", "positive": 1},
        "pii": {"drop": ["email"], "hash": ["txn id"]},
        "cleaning": {
            "nulls": {"Amount (EUR)": {"action": "impute", "value": 0.0, "flag": True},
                      "country": {"action": "reject"}},
            "ranges": {"Amount (EUR)": {"min": 0, "max": 1000}, "event_ts": {"min": "2000-01-01"}},
            "domains": {"is_fraud": [0, 1]},
        },
        "features": {"numeric": ["Amount (EUR)"], "categorical": ["country"]},
        "output": {"path": str(out)},
    }
    for key, value in extra.items():
        node = raw
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return config_from_dict(raw)


def write_csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def tag(spark, cfg: Config):
    files = list_input_files(spark, cfg.input.path)
    salt = clean.resolve_salt(cfg)
    names = cfg.names
    with contract_errors(cfg):
        tagged = tagged_rows(spark, cfg, files, salt).cache()
        outcome, _ = account(spark, cfg, files, tagged)
    return tagged, outcome, names


# ---- every quarantine reason, duplicates, imputation, PII in quarantine ------------------------------
DIRTY = [
    ["a1", "2024-01-02 10:00:00", "10.5", "US", "ann@example.com", "0"],       # clean (latest of a1)
    ["a1", "2024-01-01 10:00:00", "99.0", "US", "ann@example.com", "0"],       # duplicate (older a1)
    ["a2", "2024-01-01 11:00:00", "  ", "GB", "bob@example.com", "1"],         # clean, amount imputed
    ["a3", "2024-01-01 12:00:00", "12,5x", "US", "cy@example.com", "0"],       # cast_failed:Amount (EUR)
    ["a4", "not a time", "1.0", "US", "dee@example.com", "0"],                 # cast_failed:event_ts
    ["a5", "2024-01-01 13:00:00", "1.0", " ", "eve@example.com", "0"],         # null:country (policy)
    ["a6", "2024-01-01 14:00:00", "5000", "US", "fay@example.com", "0"],       # out_of_range:Amount (EUR)
    ["a7", "1990-01-01 00:00:00", "1.0", "US", "gus@example.com", "0"],        # out_of_range:event_ts
    ["a8", "2024-01-01 15:00:00", "1.0", "US", "hal@example.com", "7"],        # not_in_domain:is_fraud
    ["a9", "2024-01-01 16:00:00", "1.0", "US", "ivy@example.com", ""],         # null:is_fraud (label)
    ["a10", "2024-01-01 17:00:00", "1.0", "US", "jo@example.com", "0", "x"],   # malformed (extra field)
    ["", "2024-01-01 18:00:00", "1.0", "US", "kim@example.com", "0"],          # null:txn id (id)
]


def test_every_quarantine_reason_once_with_raw_values_and_no_pii(spark, tmp_path):
    src = write_csv(tmp_path / "in" / "dirty.csv", DIRTY)
    cfg = make_cfg(src, tmp_path / "out")
    tagged, outcome, names = tag(spark, cfg)

    assert outcome["counts"] == {"input": 12, "clean": 2, "quarantined": 9, "duplicates": 1}
    assert outcome["quarantine_reasons"] == {
        "cast_failed:Amount (EUR)": 1, "cast_failed:event_ts": 1, "malformed": 1, "not_in_domain:is_fraud": 1,
        "null:country": 1, "null:is_fraud": 1, "null:txn id": 1, "out_of_range:Amount (EUR)": 1,
        "out_of_range:event_ts": 1,
    }
    assert outcome["quarantine_stages"] == {"ingest": 3, "clean": 6}
    assert outcome["imputed"] == {"Amount (EUR)": 1}
    # (an empty CSV field is already null when read; blanks are whitespace-only values)
    assert outcome["blank_to_null"] == {"Amount (EUR)": 1, "country": 1}
    # the raw text, line and source file are carried on quarantined rows only (and no raw-row hash)
    carried = tagged.select(F.col(clean.STATUS).alias("status"), F.col(RAW).isNotNull().alias("raw"),
                            F.col(SOURCE).isNotNull().alias("source")).collect()
    assert {(r["status"], r["raw"], r["source"]) for r in carried} == {
        ("clean", False, False), ("duplicate", False, False), ("quarantined", True, True)}
    assert ROW_HASH not in tagged.columns

    amount = names["Amount (EUR)"]
    rows = {r["row_id"]: r for r in clean.clean_frame(tagged, cfg).collect()}
    salt = clean.resolve_salt(cfg)
    import hashlib
    import hmac

    # HMAC-SHA256 keyed by the salt, computed by the standard library (not by the code under test)
    h = {k: hmac.new(salt.encode(), k.encode(), hashlib.sha256).hexdigest() for k in ("a1", "a2")}
    assert hashlib.sha256(f"{salt}a1".encode()).hexdigest() not in rows  # not the old sha2(salt || value)
    assert set(rows) == set(h.values())                       # ids hashed with the salt, raw ids gone
    assert rows[h["a1"]][amount] == 10.5                      # the latest a1 survived de-duplication
    assert rows[h["a2"]][amount] == 0.0 and rows[h["a2"]][f"{amount}__missing"] == 1
    assert rows[h["a2"]]["label"] == 1.0 and rows[h["a1"]]["label"] == 0.0
    assert "email" not in clean.clean_frame(tagged, cfg).columns

    files = list_input_files(spark, cfg.input.path)
    lines = malformed_lines(spark, cfg, files, tagged, outcome, clean.resolve_salt(cfg))
    q = clean.quarantine_frame(tagged, cfg, "dv1", lines)
    assert "email" not in q.columns and {"reason", "stage", "raw_record", "data_version"} <= set(q.columns)
    assert {f.dataType.simpleString() for f in q.schema if f.name in names.values()} == {"string"}
    qrows = [r.asDict() for r in q.collect()]
    by_reason = {r["reason"]: r for r in qrows}
    assert by_reason["cast_failed:Amount (EUR)"][amount] == "12,5x"        # raw text kept
    assert by_reason["out_of_range:Amount (EUR)"][amount] == "5000"
    assert by_reason["malformed"]["raw_record"] is None                    # PII policy: no raw line
    # ... and no field of the malformed line (any of them may hold shifted PII), but where it is:
    assert all(by_reason["malformed"][names[c]] is None for c in SCHEMA if c != "email")
    assert by_reason["malformed"]["line_number"] == 12 and by_reason["malformed"]["source_file"].endswith("dirty.csv")
    assert {r["line_number"] for r in qrows if r["reason"] != "malformed"} == {None}
    assert {r["data_version"] for r in qrows} == {"dv1"}
    text = json.dumps(qrows, default=str)
    for secret in ("@example.com", '"a3"', '"a10"', "a10,"):
        assert secret not in text


def test_malformed_lines_get_their_numbers_in_any_file_name_and_file_block(spark, tmp_path):
    """A file name Spark URL-encodes, a declared column that is itself called ``line_number``, and a
    file split into many blocks: each malformed row still names its own physical line."""
    header = [*HEADER, "line_number"]
    lines = [",".join(header)]
    bad = []
    for i in range(3000):
        row = [f"r{i}", "2024-01-01 10:00:00", "1.5", "US", f"p{i}@example.com", "0", str(i)]
        if i in (3, 1400, 2999):
            row.append("extra")  # one field too many
            bad.append(len(lines) + 1)
        lines.append(",".join(row))
    src = tmp_path / "in put" / "größe 100%.csv"
    src.parent.mkdir()
    src.write_text("\n".join(lines) + "\n")
    cfg = make_cfg(src, tmp_path / "out", schema={**SCHEMA, "line_number": "string"})
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(16 * 1024))  # ~10 blocks in this file
    try:
        tagged, outcome, names = tag(spark, cfg)
        assert outcome["counts"]["input"] == 3000 and outcome["quarantine_reasons"] == {"malformed": 3}
        found = malformed_lines(spark, cfg, list_input_files(spark, cfg.input.path), tagged, outcome,
                                clean.resolve_salt(cfg))
        q = clean.quarantine_frame(tagged, cfg, "dv", found).collect()
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
    assert sorted(r["line_number"] for r in q) == bad
    assert {r["line_number_value"] for r in q} == {None}  # the declared column, renamed and blanked


def test_raw_line_is_kept_for_malformed_rows_without_pii_policy(spark, tmp_path):
    src = write_csv(tmp_path / "in.csv", DIRTY[:1] + DIRTY[10:11])
    cfg = make_cfg(src, tmp_path / "out", pii={"drop": [], "hash": []})
    tagged, outcome, names = tag(spark, cfg)
    assert outcome["quarantine_reasons"] == {"malformed": 1}
    (row,) = clean.quarantine_frame(tagged, cfg, "dv").collect()
    assert row["raw_record"] == "a10,2024-01-01 17:00:00,1.0,US,jo@example.com,0,x"


def test_statistic_imputation_and_case_folding(spark, tmp_path):
    rows = [["b1", "2024-01-01 00:00:00", "", " us ", "x@example.com", "0"],
            ["b2", "2024-01-01 00:00:01", "2", "US", "y@example.com", "0"],
            ["b3", "2024-01-01 00:00:02", "4", "Gb", "z@example.com", "1"]]
    cfg = make_cfg(write_csv(tmp_path / "in.csv", rows), tmp_path / "out",
                   cleaning__nulls={"Amount (EUR)": {"action": "impute", "statistic": "mean"}},
                   cleaning__lowercase_categoricals=True, cleaning__domains={"country": ["US", "GB"]},
                   features__weight_column="Amount (EUR)",
                   split={"fractions": {"train": 1.0, "val": 0.0, "test": 0.0}})
    tagged, outcome, names = tag(spark, cfg)
    assert outcome["counts"]["clean"] == 3 and outcome["imputed"] == {"Amount (EUR)": 1}
    rows_ = split_rows(tagged, cfg)[0].where(F.col("split") == "train").collect()
    assert len(rows_) == 3  # all in train, so the mean is (2 + 4) / 2
    assert sorted(r["weight"] for r in rows_) == [2.0, 3.0, 4.0]
    got = sorted((r[names["country"]], r[names["Amount (EUR)"]]) for r in rows_)
    assert got == [("gb", 4.0), ("us", 2.0), ("us", 3.0)]


@pytest.mark.parametrize("statistic, train, expected", [("mean", "243", 3.0), ("median", "214", 2.0),
                                                       ("mode", "244", 4.0)])
def test_imputation_statistics_are_fitted_on_train_only(spark, tmp_path, statistic, train, expected):
    """Val and test amounts (900s) would move every statistic; the imputed value sees train only."""
    rows = [["t1", "2024-01-01 00:00:00", "2", "US", "a@example.com", "0"],
            ["t2", "2024-01-02 00:00:00", "4", "US", "b@example.com", "0"],
            ["t3", "2024-01-03 00:00:00", "4", "US", "c@example.com", "0"],
            ["t4", "2024-01-04 00:00:00", "", "US", "d@example.com", "1"],     # train: imputed
            ["v1", "2024-07-01 00:00:00", "900", "US", "e@example.com", "0"],
            ["v2", "2024-07-02 00:00:00", "900", "US", "f@example.com", "0"],
            ["x1", "2024-10-01 00:00:00", "999", "US", "g@example.com", "0"],
            ["x2", "2024-10-02 00:00:00", "999", "US", "h@example.com", "0"],
            ["x3", "2024-10-03 00:00:00", "999", "US", "i@example.com", "0"],
            ["x4", "2024-10-04 00:00:00", "", "US", "j@example.com", "1"]]     # test: imputed too
    for i, amount in enumerate(train):
        rows[i][2] = amount
    cfg = make_cfg(write_csv(tmp_path / "in.csv", rows), tmp_path / "out",
                   cleaning__nulls={"Amount (EUR)": {"action": "impute", "statistic": statistic}},
                   split={"method": "time", "boundaries": {"val": "2024-06-01", "test": "2024-09-01"}})
    tagged, _, names = tag(spark, cfg)
    split_df, _, stats = split_rows(tagged, cfg)
    assert float(stats["Amount (EUR)"]) == expected
    amount = names["Amount (EUR)"]
    imputed = {r["split"]: r[amount] for r in split_df.where(F.col("row_id").isin(
        *[pseudonym(k, clean.resolve_salt(cfg)) for k in ("t4", "x4")])).collect()}
    assert imputed == {"train": expected, "test": expected}


def test_statistic_imputation_of_a_column_that_decides_the_split_is_a_config_error():
    with pytest.raises(ConfigError, match=r"nulls\.event_ts\.statistic.*(split time|timestamp_column)"):
        clean.check_policies(make_cfg("x", "y", cleaning__nulls={"event_ts": {"action": "impute",
                                                                              "statistic": "mode"}}))


# ---- the data contract ------------------------------------------------------------------------------
def test_missing_declared_column_names_column_and_file(spark, tmp_path):
    src = write_csv(tmp_path / "in" / "a.csv", [r[:3] + r[4:] for r in DIRTY[:2]],
                    header=[h for h in HEADER if h != "country"])
    cfg = make_cfg(src, tmp_path / "out")
    with pytest.raises(DataContractError) as err:
        tag(spark, cfg)
    assert "'country'" in str(err.value) and "a.csv" in str(err.value) and err.value.exit_code == 3


def test_undeclared_column_is_an_error_unless_allowed(spark, tmp_path):
    src = write_csv(tmp_path / "in" / "wide.csv", [r + ["extra"] for r in DIRTY[:1]] + [DIRTY[0][:3]],
                    header=[*HEADER, "note"])
    with pytest.raises(DataContractError, match=r"'note'.*not declared") as err:
        tag(spark, make_cfg(src, tmp_path / "out"))
    assert "wide.csv" in str(err.value)
    _, outcome, _ = tag(spark, make_cfg(src, tmp_path / "out", input__allow_extra_columns=True))
    # the short row is still malformed although the extra column is never used
    assert outcome["counts"] == {"input": 2, "clean": 1, "quarantined": 1, "duplicates": 0}
    assert outcome["quarantine_reasons"] == {"malformed": 1}


def test_second_file_with_another_header_names_that_file(spark, tmp_path):
    write_csv(tmp_path / "in" / "part-1.csv", DIRTY[:1])
    write_csv(tmp_path / "in" / "part-2.csv", DIRTY[2:3], header=[*HEADER[:3], "land", *HEADER[4:]])
    with pytest.raises(DataContractError) as err:
        tag(spark, make_cfg(tmp_path / "in", tmp_path / "out"))
    msg = str(err.value)
    assert "part-2.csv" in msg and "'country'" in msg


def test_json_and_parquet_inputs_go_through_the_same_code(spark, tmp_path):
    records = [dict(zip(HEADER, r, strict=True)) for r in DIRTY[:4]]
    records[0]["Amount (EUR)"] = 10.5  # a JSON number, read as text and cast
    jpath = tmp_path / "json" / "in.json"
    jpath.parent.mkdir()
    jpath.write_text("\n".join(json.dumps(r) for r in records) + "\n{not json\n")
    _, outcome, _ = tag(spark, make_cfg(jpath, tmp_path / "o1", fmt="json"))
    assert outcome["counts"] == {"input": 5, "clean": 2, "quarantined": 2, "duplicates": 1}
    assert outcome["quarantine_reasons"] == {"cast_failed:Amount (EUR)": 1, "malformed": 1}

    pq_dir = str(tmp_path / "pq")
    (spark.createDataFrame([("p1", "2024-01-01 00:00:00", 1.5, "US", "x@example.com", 1),
                            ("p2", "2024-01-01 00:00:00", -3.0, "US", "y@example.com", 0)],
                           "`txn id` string, event_ts string, `Amount (EUR)` double, country string, "
                           "email string, is_fraud long")
     .withColumn("event_ts", F.col("event_ts").cast("timestamp")).write.parquet(pq_dir))
    _, outcome, _ = tag(spark, make_cfg(pq_dir, tmp_path / "o2", fmt="parquet"))
    assert outcome["counts"] == {"input": 2, "clean": 1, "quarantined": 1, "duplicates": 0}
    assert outcome["quarantine_reasons"] == {"out_of_range:Amount (EUR)": 1}

    records[1]["surprise"] = "x"
    jpath.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with pytest.raises(DataContractError, match=r"'surprise'.*in\.json|in\.json.*'surprise'"):
        tag(spark, make_cfg(jpath, tmp_path / "o3", fmt="json"))


def test_empty_input_is_a_clear_contract_error(spark, tmp_path):
    empty = tmp_path / "empty" / "a.csv"
    empty.parent.mkdir()
    empty.write_text("")
    with pytest.raises(DataContractError, match="empty"):
        list_input_files(spark, str(empty.parent))
    with pytest.raises(DataContractError, match="no input files"):
        list_input_files(spark, str(tmp_path / "nothing-here"))
    only_header = write_csv(tmp_path / "hdr" / "a.csv", [])
    with pytest.raises(DataContractError, match="no data rows"):
        run_prepare(spark, make_cfg(only_header, tmp_path / "out"))


def test_missing_salt_is_a_config_error_before_any_spark_work(tmp_path, monkeypatch):
    monkeypatch.delenv("DOWNPOUR_PII_SALT", raising=False)
    cfg = make_cfg(tmp_path / "in.csv", tmp_path / "out")
    with pytest.raises(ConfigError, match="DOWNPOUR_PII_SALT") as err:
        run_prepare(None, cfg)  # type: ignore[arg-type]  # no Spark at all: it must fail first
    assert err.value.exit_code == 2
    cfg2 = make_cfg(tmp_path / "in.csv", tmp_path / "out", pii={"hash": ["txn id"], "salt_env": "MY_SALT_VAR"})
    with pytest.raises(ConfigError, match="MY_SALT_VAR"):
        run_prepare(None, cfg2)  # type: ignore[arg-type]


def test_persist_level_is_validated_before_any_work(spark, tmp_path):
    from downpour.spark import PERSIST_LEVEL_KEY, persist_level

    assert persist_level(spark).useDisk and not persist_level(spark).useMemory  # DISK_ONLY by default
    cfg = make_cfg(write_csv(tmp_path / "in.csv", DIRTY[:1]), tmp_path / "out")
    spark.conf.set(PERSIST_LEVEL_KEY, "memory_and_disk")
    try:
        assert persist_level(spark).useMemory
        spark.conf.set(PERSIST_LEVEL_KEY, "RAM_PLEASE")
        with pytest.raises(ConfigError, match=r"spark\.downpour\.persistLevel.*RAM_PLEASE") as err:
            run_prepare(spark, cfg)
        assert err.value.exit_code == 2 and not (tmp_path / "out").exists()
    finally:
        spark.conf.unset(PERSIST_LEVEL_KEY)


def _cached_bytes(spark) -> int:
    """Bytes of the first cached columnar batch Spark builds for 20k rows of one repeated string persisted
    ``DISK_ONLY`` (read from the cache itself: its columns' buffers, before any stream compression)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    df = spark.range(20_000).select(F.lit("the same text on every row").alias("s")).persist(StorageLevel.DISK_ONLY)
    try:
        df.count()
        cached = spark._jsparkSession.sharedState().cacheManager().lookupCachedData(df._jdf).get()
        batch = cached.cachedRepresentation().cacheBuilder().cachedColumnBuffers().first()
        return sum(len(b) for b in batch.buffers())
    finally:
        df.unpersist(blocking=True)


def test_stage_caches_skip_columnar_compression_and_the_session_setting_comes_back(spark, tmp_path, monkeypatch):
    from downpour.pipelines import prepare as prepare_mod
    from downpour.spark import CACHE_COMPRESSED_KEY, PERSIST_COMPRESSED_KEY, PERSIST_LEVEL_KEY, persisting

    with persisting(spark):  # a session that never set the key gets it unset again
        assert spark.conf.get(CACHE_COMPRESSED_KEY) == "false"
    assert spark.conf.get(CACHE_COMPRESSED_KEY, None) is None
    spark.conf.set(CACHE_COMPRESSED_KEY, "true")
    try:
        with persisting(spark):
            assert spark.conf.get(CACHE_COMPRESSED_KEY) == "false"
            plain = _cached_bytes(spark)
        assert spark.conf.get(CACHE_COMPRESSED_KEY) == "true"  # the session's own setting is back
        with pytest.raises(RuntimeError, match="stage failed"), persisting(spark):
            raise RuntimeError("stage failed")
        assert spark.conf.get(CACHE_COMPRESSED_KEY) == "true"  # and after a failing stage too
        # the companion: with the opt-in the session's compression applies, and the check sees it
        spark.conf.set(PERSIST_COMPRESSED_KEY, "true")
        with persisting(spark):
            packed = _cached_bytes(spark)
        assert plain > 10 * packed, (plain, packed)
        spark.conf.unset(PERSIST_COMPRESSED_KEY)
        spark.conf.set(PERSIST_LEVEL_KEY, "MEMORY_AND_DISK")  # blocks in the heap keep the session's setting
        with persisting(spark):
            assert spark.conf.get(CACHE_COMPRESSED_KEY) == "true"
        spark.conf.unset(PERSIST_LEVEL_KEY)

        # the stage itself: its first action over the persisted rows runs inside the scope
        seen: list[str] = []
        real_account = prepare_mod.account

        def account(*args, **kwargs):
            seen.append(spark.conf.get(CACHE_COMPRESSED_KEY))
            return real_account(*args, **kwargs)

        monkeypatch.setattr(prepare_mod, "account", account)
        cfg = make_cfg(write_csv(tmp_path / "in.csv", DIRTY), tmp_path / "out")
        run_prepare(spark, cfg)
        assert seen == ["false"] and spark.conf.get(CACHE_COMPRESSED_KEY) == "true"

        spark.conf.set(PERSIST_COMPRESSED_KEY, "sometimes")
        with pytest.raises(ConfigError, match=r"spark\.downpour\.persistCompressed.*sometimes") as err:
            run_prepare(spark, make_cfg(tmp_path / "in.csv", tmp_path / "out2"))
        assert err.value.exit_code == 2 and not (tmp_path / "out2").exists()
        assert spark.conf.get(CACHE_COMPRESSED_KEY) == "true"
        from downpour.training.evaluate import run_evaluation

        with pytest.raises(ConfigError, match=r"spark\.downpour\.persistCompressed"):  # the gate's, before any work
            run_evaluation(spark, make_cfg(tmp_path / "in.csv", tmp_path / "nothing-prepared"), gate=True)
    finally:
        for key in (PERSIST_COMPRESSED_KEY, PERSIST_LEVEL_KEY, CACHE_COMPRESSED_KEY):
            spark.conf.unset(key)


def test_bad_policy_values_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"cleaning\.ranges\.event_ts\.min"):
        clean.check_policies(make_cfg("x", "y", cleaning__ranges={"event_ts": {"min": "yesterday-ish"}}))
    with pytest.raises(ConfigError, match=r"cleaning\.domains\.is_fraud\[1\]"):
        clean.check_policies(make_cfg("x", "y", cleaning__domains={"is_fraud": [0, "maybe"]}))
    with pytest.raises(ConfigError, match=r"pii\.drop.*id_column"):
        clean.check_policies(make_cfg("x", "y", pii={"drop": ["txn id"]}))


# ---- the invariant on generated dirty data (property-based) ------------------------------------------
_AMOUNTS = st.one_of(st.floats(0, 999, allow_nan=False).map(lambda x: f"{x:.2f}"), st.just(""),
                     st.just("-5"), st.just("2e9"), st.just("n/a"))
_TIMES = st.one_of(st.integers(0, 10_000).map(lambda s: f"2024-01-01 {s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"),
                   st.just("bogus"), st.just("1999-12-31 23:59:59"))
_LABELS = st.sampled_from(["0", "1", "1", "", "7", "yes"])
_ROW = st.tuples(st.integers(0, 12).map(lambda i: f"id{i}"), _TIMES, _AMOUNTS,
                 st.sampled_from(["US", "GB", " ", "FR "]), _LABELS, st.booleans())
_REASON_ORDER = ["malformed", "cast_failed:event_ts", "cast_failed:Amount (EUR)", "cast_failed:is_fraud",
                 "null:country", "null:is_fraud", "out_of_range:Amount (EUR)", "out_of_range:event_ts",
                 "not_in_domain:is_fraud"]


def _expected(rows: list[tuple]) -> tuple[dict[str, int], dict[str, int]]:
    """An independent oracle: the status of each generated row by the rules of make_cfg()."""
    reasons: dict[str, int] = {}
    valid_ids: list[str] = []
    for rid, ts, amount, country, label, malformed in rows:
        why = []
        if malformed:
            why.append("malformed")
        if ts == "bogus":
            why.append("cast_failed:event_ts")
        if amount == "n/a":
            why.append("cast_failed:Amount (EUR)")
        if label == "yes":
            why.append("cast_failed:is_fraud")
        if not country.strip():
            why.append("null:country")
        if label == "":
            why.append("null:is_fraud")
        if amount in ("-5", "2e9"):
            why.append("out_of_range:Amount (EUR)")
        if ts.startswith("1999"):
            why.append("out_of_range:event_ts")
        if label == "7":
            why.append("not_in_domain:is_fraud")
        if why:
            first = min(why, key=_REASON_ORDER.index)
            reasons[first] = reasons.get(first, 0) + 1
        else:
            valid_ids.append(rid)
    q = sum(reasons.values())
    counts = {"input": len(rows), "clean": len(set(valid_ids)), "quarantined": q,
              "duplicates": len(valid_ids) - len(set(valid_ids))}
    return counts, reasons


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_ROW, min_size=1, max_size=25))
def test_invariant_holds_on_generated_dirty_data(spark, tmp_path_factory, rows):
    lines = [[rid, ts, amount, country, f"{rid}@example.com", label] + (["oops"] if bad else [])
             for rid, ts, amount, country, label, bad in rows]
    src = write_csv(tmp_path_factory.mktemp("prop") / "in.csv", lines)
    cfg = make_cfg(src, "/unused")
    tagged, outcome, _ = tag(spark, cfg)
    tagged.unpersist()
    expected_counts, expected_reasons = _expected(rows)
    assert outcome["counts"] == expected_counts
    assert outcome["quarantine_reasons"] == expected_reasons


def test_a_mean_cannot_impute_a_column_with_a_domain():
    """A mean need not be an allowed value; the median and the mode are observed values, so they are."""
    nulls = {"Amount (EUR)": {"action": "impute", "statistic": "mean"}}
    domains = {"Amount (EUR)": [1.0, 2.0, 5.0]}
    with pytest.raises(ConfigError, match=r"nulls\.Amount \(EUR\)\.statistic.*domains\.Amount \(EUR\)"):
        clean.check_policies(make_cfg("x", "y", cleaning__nulls=nulls, cleaning__domains=domains))
    nulls["Amount (EUR)"]["statistic"] = "median"
    clean.check_policies(make_cfg("x", "y", cleaning__nulls=nulls, cleaning__domains=domains))


def test_ties_between_duplicates_are_broken_by_their_values_whatever_the_input_order(spark, tmp_path):
    """Rows of one id at one time differ only in their values: the same one is kept however the input is
    ordered or split into files (the tie-break is the values, never the position of a row)."""
    tied = [["t1", "2024-01-01 10:00:00", amount, country, "x@example.com", "0"]
            for amount, country in [("7.0", "US"), ("3.0", "US"), ("3.0", "DE"), ("12.5", "FR")]]
    # equal values once imputed (a blank amount is imputed 0.0), but only one is flagged as missing
    imputed = [["t2", "2024-01-01 11:00:00", amount, "US", "x@example.com", "0"] for amount in ("", "0.0")]
    other = [[f"o{i}", "2024-01-02 10:00:00", "1.0", "US", "y@example.com", "0"] for i in range(6)]
    kept = []
    orders = [tied + imputed + other, other + imputed[::-1] + tied[::-1],
              [tied[2], imputed[1], *other, tied[0], imputed[0], tied[3], tied[1]]]
    for k, rows in enumerate(orders):
        for j in range(2):  # the rows spread over two files, in another order each time
            write_csv(tmp_path / f"in{k}" / f"part-{j}.csv", rows[j::2])
        tagged, outcome, names = tag(spark, make_cfg(tmp_path / f"in{k}", tmp_path / f"out{k}"))
        assert outcome["counts"]["duplicates"] == 4
        amount, flag = names["Amount (EUR)"], clean.flag_columns(make_cfg(tmp_path, tmp_path))["Amount (EUR)"]
        got = {r["row_id"]: (r[amount], r[names["country"]], r[flag]) for r in tagged
               .where((F.col(clean.STATUS) == "clean") & F.col("row_id").isin(pseudonym("t1", "test-salt"),
                                                                                pseudonym("t2", "test-salt")))
               .collect()}
        assert len(got) == 2
        kept.append(got)
    # the smallest values (amount, then country); at equal values, the row that was not imputed
    assert kept[0] == kept[1] == kept[2] == {pseudonym("t1", "test-salt"): (3.0, "DE", 0),
                                             pseudonym("t2", "test-salt"): (0.0, "US", 0)}


def test_dedup_without_an_id_or_a_time_column_keeps_one_of_each_raw_row(spark, tmp_path):
    """No id and no event time: a duplicate is the same raw row, and one of each is kept."""
    rows = [["a", "2024-01-01 10:00:00", "1.0", "US", "x@example.com", "0"],
            ["b", "2024-01-01 10:00:00", "2.0", "US", "x@example.com", "1"]]
    write_csv(tmp_path / "in" / "part-0.csv", [rows[0], rows[1], rows[0], rows[0]])
    cfg = make_cfg(tmp_path / "in", tmp_path / "out", id_column=None, timestamp_column=None)
    tagged, outcome, _ = tag(spark, cfg)
    assert outcome["counts"] == {"input": 4, "clean": 2, "quarantined": 0, "duplicates": 2}


def test_a_frame_that_fails_to_release_does_not_keep_the_others_or_hide_the_stage_error(spark):
    """The stage's end releases every held frame even when one unpersist raises (a stopped context), and
    the stage's own error is the one that propagates."""
    from downpour.spark import persisting

    spark.catalog.clearCache()
    cache = spark._jsparkSession.sharedState().cacheManager()
    with pytest.raises(ValueError, match="the stage's own error"), persisting(spark) as stage:
        first = stage.persist(spark.range(10).selectExpr("id * 2 AS x"))
        stuck = stage.persist(spark.range(10).selectExpr("id * 3 AS x"))
        stuck.count()
        stuck.unpersist = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("context stopped"))  # type: ignore[method-assign]
        first.count()
        raise ValueError("the stage's own error")
    assert stage.held == 0
    assert cache.lookupCachedData(first._jdf).isEmpty()  # released although the frame after it failed to
    assert not cache.lookupCachedData(stuck._jdf).isEmpty()  # the one that raised is still cached: it is real
    spark.catalog.clearCache()


def test_the_non_blank_filter_takes_only_a_positive_character_class(spark):
    """The record count's filter negates the blank class it is given; a class that is already negated
    (or not a class) would count the wrong lines, so it is refused, also under ``python -O``."""
    from pyspark.sql import functions as F

    from downpour.pipelines.ingest import CSV_BLANK, _non_blank

    df = spark.createDataFrame([(" \t",), (" x ",), ("",)], "value string")
    assert df.where(_non_blank(F.col("value"), CSV_BLANK)).count() == 1
    for bad in ("[^ ]", " \t", "[ \t"):
        with pytest.raises(ValueError, match="positive character class"):
            _non_blank(F.col("value"), bad)


def test_imputed_medians_are_the_column_s_values(spark):
    """A long median is exact (an epoch in milliseconds is not rounded to 12 digits), a zero median is 0.0
    whatever its rows' signs, and a mean is the exact mean."""
    from downpour.pipelines.clean import null_statistics

    cfg = config_from_dict({
        "name": "t", "input": {"path": "/data/t.csv"}, "output": {"path": "/tmp/out"},
        "schema": {"k": "string", "ms": "long", "x": "double", "m": "double", "y": "int"},
        "label": {"column": "y", "positive": 1}, "features": {"numeric": ["x"]},
        "cleaning": {"nulls": {"ms": {"action": "impute", "statistic": "median"},
                               "x": {"action": "impute", "statistic": "median"},
                               "m": {"action": "impute", "statistic": "mean"}}},
    })
    n = cfg.names
    rows = [(str(i), 1_700_000_000_123 + i, -0.0 if i % 2 else 0.0, 0.1 * i, 1) for i in range(5)]
    df = spark.createDataFrame(rows, f"{n['k']} string, {n['ms']} long, {n['x']} double, {n['m']} double, {n['y']} int")
    stats = null_statistics(df, cfg)
    assert stats["ms"] == 1_700_000_000_125 and isinstance(stats["ms"], int)
    assert stats["x"] == 0.0 and math.copysign(1.0, stats["x"]) == 1.0
    assert stats["m"] == 0.2


def test_a_stage_looks_up_sparks_functions_by_their_own_import(spark, monkeypatch):
    """Every stage's scope (``persisting``, also on a notebook's or spark-submit's session) imports Spark's
    ``functions`` class into the driver's py4j view, so that each ``F.*`` call finds it without trying the
    wildcard-imported packages first. Shown on a fresh view in the context's place: before the scope the
    name is no class there, inside it is ``org.apache.spark.sql.functions``, the class PySpark's own
    view finds."""
    from py4j.java_gateway import JavaClass
    from pyspark import SparkContext

    from downpour.spark import persisting

    fresh = spark.sparkContext._gateway.new_jvm_view("test-fresh-view")
    monkeypatch.setattr(SparkContext, "_jvm", fresh)
    assert not isinstance(fresh.functions, JavaClass)
    with persisting(spark):
        assert isinstance(fresh.functions, JavaClass)
        assert fresh.functions._fqn == "org.apache.spark.sql.functions" == spark._jvm.functions._fqn
        assert fresh.functions.col("id").toString() == "id"


def test_each_costly_value_of_a_row_is_computed_once(spark, tmp_path, plan_text):
    """The try-casts, the PII pseudonym and the policy rules stand once in the ingest's plan
    (``ingest.parse_columns``, ``clean.apply_policies``): Spark 3.5 evaluates a copy that sits in a
    conditional branch again for every row, and such copies made the parse a third slower."""
    src = write_csv(tmp_path / "in.csv", DIRTY[:3])
    cfg = make_cfg(src, tmp_path / "out")
    plan = plan_text(tagged_rows(spark, cfg, list_input_files(spark, str(src)), clean.resolve_salt(cfg)))
    assert plan.count("try_cast(") == sum(t != "string" for t in SCHEMA.values())  # event_ts, amount, label
    # an HMAC is two SHA-256: the hashed id's, and a malformed line's (a key for its line number)
    assert plan.count("sha2(") == 2 * (len(cfg.pii.hash) + 1)
    assert plan.count("> 1000.0)") == 1  # the amount's range rule, in the one chain of rules


def test_the_plan_count_sees_a_value_written_twice(spark, plan_text):
    """Companion: the way the ingest used to write a cast (the value, and again inside the chain of
    reasons) puts two copies in the plan, which the count above would report."""
    df = spark.createDataFrame([("1",), ("x",)], "v string")
    cast = F.expr("try_cast(v AS double)")
    twice = df.select(cast.alias("d"), F.when(F.col("v").isNull(), F.lit("null"))
                      .when(cast.isNull(), F.lit("cast_failed")).alias("reason"))
    assert plan_text(twice).count("try_cast(") == 2
    once = df.select(cast.alias("d"), "v")
    once = once.select("d", F.when(F.col("v").isNull(), F.lit("null")).when(F.col("d").isNull(), F.lit("cast_failed"))
                       .alias("reason"))
    assert plan_text(once).count("try_cast(") == 1


def test_scoring_writes_a_row_s_raw_values_as_json_only_where_the_quarantine_keeps_them(spark, tmp_path, plan_text):
    """The persisted scoring batch turns a row's raw values into JSON under the condition that keeps
    them (a reason): blanked in a projection of their own, they were written for every row."""
    import re

    from downpour.pipelines import score

    src = write_csv(tmp_path / "in.csv", DIRTY[:4])
    cfg = make_cfg(src, tmp_path / "out")

    class Keep:  # the frame score persists, left unpersisted
        def persist(self, df):
            self.df = df
            return df

    keep = Keep()
    batch = score._ingest(spark, keep, cfg, score._scoring_config(cfg, str(src), None),
                          list_input_files(spark, str(src)), clean.resolve_salt(cfg), {})
    assert batch.clean_n == {True: 3, False: 1}  # a3: cast_failed
    plan = plan_text(keep.df)
    assert plan.count("to_json(") == 1
    assert re.search(r"CASE WHEN isnotnull\(_dp_reason#\d+\) THEN to_json\(", plan)
