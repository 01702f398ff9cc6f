"""Entity history (features/history.py): window values of new rows computed over a trimmed history equal
those computed over the whole past, for velocity (hot keys included) and RFM; and what breaks without it.

The reference is the windows engine run over every event at once (what ``prepare`` does); the history
side runs it over ``trim(past) + new rows`` and keeps the new rows, as ``score`` does.
"""

from __future__ import annotations

import datetime as dt
import random

import numpy as np
import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

from downpour.config import config_from_dict
from downpour.errors import DataContractError
from downpour.features import history as H
from downpour.features.windows import add_window_features, window_features

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
D = 86_400


def fraud_cfg(**velocity):
    vel = {"enabled": True, "entities": ["card_id", "customer_id"], "amount_column": "amount",
           "windows": ["1h", "24h", "7d"], "device_column": "device_id", "country_column": "ip_country",
           **velocity}
    return config_from_dict({
        "name": "t", "input": {"path": "/data/tx.csv"},
        "schema": {"transaction_id": "string", "event_ts": "timestamp", "card_id": "string",
                   "customer_id": "string", "amount": "double", "device_id": "string", "ip_country": "string",
                   "is_fraud": "int"},
        "id_column": "transaction_id", "timestamp_column": "event_ts", "label": {"column": "is_fraud"},
        "features": {"numeric": ["amount"], "velocity": vel}, "output": {"path": "/tmp/out"},
    })


def rfm_cfg(**rfm):
    spec = {"enabled": True, "entity": "customer_id", "amount_column": "spend", "frequency_column": "sessions",
            "windows": ["90d", "180d"], **rfm}
    return config_from_dict({
        "name": "t", "input": {"path": "/data/crm.csv"},
        "schema": {"customer_id": "string", "snapshot_date": "timestamp", "sessions": "int", "spend": "double",
                   "signup_date": "date", "churned": "int"},
        "timestamp_column": "snapshot_date", "label": {"column": "churned"},
        "features": {"numeric": ["spend"], "rfm": spec}, "output": {"path": "/tmp/out"},
    })


def fraud_events(spark, n: int = 900, days: int = 40, seed: int = 7):
    """Transactions of 40 cards over 40 days; some cards go quiet for weeks (their last event is older than
    the horizon), devices and countries repeat, one card is hot."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        card = "HOT" if rng.random() < 0.15 else f"c{rng.randrange(40)}"
        quiet = card in ("c1", "c2", "c3") and rng.random() < 0.9  # mostly early: state rows are needed
        secs = rng.randrange(0, (8 if quiet else days) * D)
        rows.append((f"t{i}", T0 + dt.timedelta(seconds=secs), card, f"u{rng.randrange(25)}",
                     round(rng.uniform(1, 500), 2), f"d{rng.randrange(6)}", rng.choice(["US", "FR", "GB", "DE"]), 0))
    # a quiet card (last event long before the cut), a device and a country of card
    # c5 seen only early: after the cut they come back (time since previous, first device / country)
    early, late = T0 + dt.timedelta(days=2), T0 + dt.timedelta(days=33)
    rows += [("q1", early, "QUIET", None, 10.0, None, None, 0),  # only the per-card state keeps it
             ("q2", late, "QUIET", "uq", 20.0, "dq", "US", 0),
             ("q3", early, "c5", "u1", 30.0, "d-old", "JP", 0), ("q4", late, "c5", "u1", 40.0, "d-old", "JP", 0),
             # a customer quiet on a busy card (only the per-customer state keeps its last event)
             ("q5", early, "HOT", "uq2", 50.0, "d0", "US", 0), ("q6", late, "c7", "uq2", 60.0, "d1", "FR", 0)]
    schema = T.StructType([T.StructField(c, t) for c, t in [
        ("transaction_id", T.StringType()), ("event_ts", T.TimestampType()), ("card_id", T.StringType()),
        ("customer_id", T.StringType()), ("amount", T.DoubleType()), ("device_id", T.StringType()),
        ("ip_country", T.StringType()), ("is_fraud", T.IntegerType())]])
    return spark.createDataFrame(rows, schema)


def crm_events(spark, customers: int = 30, months: int = 24, seed: int = 3):
    """Monthly snapshots; every third customer is dormant (no active month) for the 8 months before the
    cut at month 20, so its last active month is older than the 180-day horizon (recency needs state)."""
    rng = random.Random(seed)
    rows = []
    for c in range(customers):
        start = rng.randrange(0, 12)
        for m in range(start, months):
            active = rng.random() < 0.7 and not (c % 3 == 0 and 12 <= m < 20)
            rows.append((f"k{c}", T0 + dt.timedelta(days=30 * m), rng.randrange(1, 20) if active else 0,
                         round(rng.uniform(0, 90), 2) if active else 0.0,
                         (T0 - dt.timedelta(days=40 * c)).date(), 0))
    schema = T.StructType([T.StructField(c, t) for c, t in [
        ("customer_id", T.StringType()), ("snapshot_date", T.TimestampType()), ("sessions", T.IntegerType()),
        ("spend", T.DoubleType()), ("signup_date", T.DateType()), ("churned", T.IntegerType())]])
    return spark.createDataFrame(rows, schema)


def _split(df, ts: str, cut: dt.datetime):
    return df.where(F.col(ts) < F.lit(cut)), df.where(F.col(ts) >= F.lit(cut))


def _windowed_new_rows(cfg, past_history, new):
    rows = new.withColumn(H.HID, H.identity(new, cfg))
    out = H.drop_context(add_window_features(H.with_context(rows, past_history), cfg)).drop(H.HID)
    return out


def _features(df, cfg, key):
    cols = [f.name for f in window_features(cfg)]
    pdf = df.select(*key, *cols).toPandas().sort_values(key).reset_index(drop=True)
    return pdf, cols


def _reference_and_history(spark, cfg, df, cut, key, trim=True):
    names = cfg.names
    ts = names[cfg.timestamp_column]
    past, new = _split(df, ts, cut)
    ref = add_window_features(df, cfg).where(F.col(ts) >= F.lit(cut))
    events = H.events(past, cfg)
    _, end, _ = H.span(events, cfg)
    kept = H.trim(events, cfg, end) if trim else events
    got = _windowed_new_rows(cfg, kept, new)
    a, cols = _features(ref, cfg, key)
    b, _ = _features(got, cfg, key)
    return a, b, cols, kept.count(), past.count()


def _assert_same(a, b, cols):
    assert len(a) == len(b) > 0
    for c in cols:
        np.testing.assert_allclose(b[c].to_numpy(float), a[c].to_numpy(float), rtol=1e-12, atol=0, equal_nan=True,
                                   err_msg=c)


def test_velocity_with_hot_key_buckets_over_trimmed_history_equals_the_whole_past(spark):
    cfg = fraud_cfg(hot_key_rows=25)
    df = fraud_events(spark)
    a, b, cols, kept, past = _reference_and_history(spark, cfg, df, T0 + dt.timedelta(days=30), ["transaction_id"])
    _assert_same(a, b, cols)
    assert kept < past * 0.5, "the history is trimmed to the horizon plus per-entity state"


def test_rfm_with_signup_over_trimmed_history_equals_the_whole_past(spark):
    cfg = rfm_cfg(signup_column="signup_date")
    df = crm_events(spark).withColumn("_k", F.concat_ws("/", "customer_id", F.col("snapshot_date").cast("string")))
    a, b, cols, kept, past = _reference_and_history(spark, cfg, df, T0 + dt.timedelta(days=30 * 20), ["_k"])
    _assert_same(a, b, cols)
    assert kept < past  # trimmed: most early months are gone


def _differing(ref, got, cols) -> set[str]:
    return {c for c in cols if not np.allclose(got[c].to_numpy(float), ref[c].to_numpy(float), equal_nan=True)}


@pytest.mark.parametrize("kind", ["fraud", "crm"])
def test_trimmed_history_is_exact_and_without_any_state_row_or_history_the_values_differ(spark, monkeypatch, kind):
    """Over ``trim(past)`` the new rows' window values equal those over the whole past (velocity without
    hot keys; RFM without signup). Companions: drop one kind of state row from the trim at a time (or the
    whole history) and they change: every part of the trim is needed, and the check sees it."""
    if kind == "fraud":
        cfg, df, key, cut = fraud_cfg(hot_key_rows=None), fraud_events(spark), ["transaction_id"], \
            T0 + dt.timedelta(days=30)
    else:
        cfg = rfm_cfg()
        df = crm_events(spark).withColumn("_k", F.concat_ws("/", "customer_id", F.col("snapshot_date").cast("string")))
        key, cut = ["_k"], T0 + dt.timedelta(days=30 * 20)
    names = cfg.names
    ts = names[cfg.timestamp_column]
    past, new = _split(df, ts, cut)
    events = H.events(past, cfg)
    _, end, _ = H.span(events, cfg)
    ref, cols = _features(add_window_features(df, cfg).where(F.col(ts) >= F.lit(cut)), cfg, key)
    kept = H.trim(events, cfg, end)
    got, _ = _features(_windowed_new_rows(cfg, kept, new), cfg, key)
    _assert_same(ref, got, cols)
    assert kept.count() < past.count() * (0.5 if kind == "fraud" else 1), "the history is trimmed"
    full = H.keepers(cfg)
    assert len(full) == (4 if kind == "fraud" else 2)
    for dropped in full:
        monkeypatch.setattr(H, "keepers", lambda *a, d=dropped: [k for k in full if k != d])
        got, _ = _features(_windowed_new_rows(cfg, H.trim(events, cfg, end), new), cfg, key)
        assert _differing(ref, got, cols), f"without the {dropped.name} rows nothing changed"
    monkeypatch.undo()
    got, _ = _features(_windowed_new_rows(cfg, None, new), cfg, key)
    assert _differing(ref, got, cols), "without any history nothing changed"


def test_a_new_row_at_the_exact_end_of_the_history_sees_the_event_before_it(spark):
    """Velocity windows exclude events of the same instant: a new row at the history's last time needs
    the entity's last event strictly before it, which may be older than the horizon."""
    cfg = fraud_cfg(hot_key_rows=None)
    df = fraud_events(spark, n=0)
    end_t = T0 + dt.timedelta(days=33)
    past = df.where(F.col("event_ts") < F.lit(end_t + dt.timedelta(seconds=1)))  # QUIET: days 2 and 33
    extra = spark.createDataFrame([("q9", end_t, "QUIET", "uq", 5.0, "dq", "US", 0)], df.schema)
    events = H.events(past, cfg)
    _, end, _ = H.span(events, cfg)
    assert end == int(end_t.timestamp() * 1e6)
    ref, cols = _features(add_window_features(past.unionByName(extra), cfg)
                          .where(F.col("transaction_id") == "q9"), cfg, ["transaction_id"])
    got, _ = _features(_windowed_new_rows(cfg, H.trim(events, cfg, end), extra), cfg, ["transaction_id"])
    _assert_same(ref, got, cols)
    assert ref["vel_card_id_secs_since_prev"][0] == 31 * D


def _three_partitionings(df):
    return df.repartition(1), df.repartition(5, F.rand(3)), df.coalesce(3)


def test_ties_at_an_entitys_last_time_keep_one_event_the_same_one_however_the_rows_are_split(spark):
    """Three events of a quiet card share its last time, long before the horizon: the trim keeps one of
    them (the largest id), whatever the partitioning, and a later row's windows still equal the whole past's."""
    cfg = fraud_cfg(hot_key_rows=None)
    df = fraud_events(spark, n=200)
    early, late = T0 + dt.timedelta(days=3), T0 + dt.timedelta(days=35)
    ties = [(f"tie{i}", early, "TIE", "ut", 10.0 + i, "dt", "US", 0) for i in range(3)]
    df = df.unionByName(spark.createDataFrame([*ties, ("tie-new", late, "TIE", "ut", 1.0, "dt", "US", 0)],
                                              df.schema))
    cut = T0 + dt.timedelta(days=30)
    past, new = _split(df, "event_ts", cut)
    events = H.events(past, cfg)
    _, end, _ = H.span(events, cfg)
    picks = [sorted(r[0] for r in H.trim(frame, cfg, end).select(H.HID).collect())
             for frame in _three_partitionings(events)]
    assert picks[0] == picks[1] == picks[2]
    assert [h for h in picks[0] if h.startswith("tie")] == ["tie2"]
    ref, cols = _features(add_window_features(df, cfg).where(F.col("event_ts") >= F.lit(cut)), cfg,
                          ["transaction_id"])
    got, _ = _features(_windowed_new_rows(cfg, H.trim(events, cfg, end), new), cfg, ["transaction_id"])
    _assert_same(ref, got, cols)
    assert ref.loc[ref["transaction_id"] == "tie-new", "vel_card_id_secs_since_prev"].item() == 32 * D


def test_ties_at_an_rfm_entitys_first_and_last_active_time_keep_one_event_each(spark):
    """RFM's picks (first event: ``min``; last active event: ``max`` over active rows only) with ties, long
    before the horizon: one event kept per pick, the same under any partitioning, and later rows' RFM
    values (tenure, recency) equal the whole past's."""
    cfg = rfm_cfg()
    df = crm_events(spark)
    first, active = T0 - dt.timedelta(days=400), T0 - dt.timedelta(days=300)
    ties = [("KT", first, 0, 0.0, None, 0), ("KT", first, 0, 1.5, None, 0),  # tenure: first event, tied
            ("KT", active, 3, 9.0, None, 0), ("KT", active, 4, 9.0, None, 0),  # recency: last active, tied
            ("KT", active + dt.timedelta(days=30), 0, 0.0, None, 0)]  # inactive after it
    new_row = ("KT", T0 + dt.timedelta(days=30 * 21), 2, 5.0, None, 0)
    df = df.unionByName(spark.createDataFrame([*ties, new_row], df.schema))
    df = df.withColumn("_k", F.concat_ws("/", "customer_id", F.col("snapshot_date").cast("string"),
                                         F.col("sessions").cast("string"), F.col("spend").cast("string")))
    cut = T0 + dt.timedelta(days=30 * 20)
    past, new = _split(df, "snapshot_date", cut)
    events = H.events(past, cfg)
    _, end, _ = H.span(events, cfg)
    kept = [sorted(tuple(r) for r in H.trim(frame, cfg, end).where(F.col("customer_id") == "KT")
                   .select(H.HID, F.unix_micros("snapshot_date")).collect())
            for frame in _three_partitionings(events)]
    assert kept[0] == kept[1] == kept[2]
    assert sorted(t for _, t in kept[0]) == [int(first.timestamp() * 1e6), int(active.timestamp() * 1e6)]
    ref, cols = _features(add_window_features(df, cfg).where(F.col("snapshot_date") >= F.lit(cut)), cfg, ["_k"])
    got, _ = _features(_windowed_new_rows(cfg, H.trim(events, cfg, end), new), cfg, ["_k"])
    _assert_same(ref, got, cols)


def test_a_history_row_with_the_id_of_a_new_row_counts_once(spark):
    cfg = fraud_cfg(hot_key_rows=None)
    df = fraud_events(spark, n=300)
    cut = T0 + dt.timedelta(days=30)
    past, new = _split(df, "event_ts", cut)
    events = H.events(df, cfg)  # the history already holds the new rows
    ref, cols = _features(add_window_features(df, cfg).where(F.col("event_ts") >= F.lit(cut)), cfg,
                          ["transaction_id"])
    got, _ = _features(_windowed_new_rows(cfg, events, new), cfg, ["transaction_id"])
    _assert_same(ref, got, cols)


def test_history_dataset_round_trip_and_column_check(spark, tmp_path):
    cfg = fraud_cfg(hot_key_rows=None)
    events = H.events(fraud_events(spark, n=200), cfg)
    _, end, _ = H.span(events, cfg)
    meta = H.write(H.trim(events, cfg, end), str(tmp_path / "h"), cfg, end)
    assert H.is_history(str(tmp_path / "h")) and meta.rows > 0 and meta.horizon_seconds == 7 * D
    df, back = H.read(spark, str(tmp_path / "h"), cfg)
    assert back == meta and df.count() == meta.rows
    for other in (fraud_cfg(hot_key_rows=None, device_column=None),  # other columns
                  fraud_cfg(hot_key_rows=None, windows=["1h", "30d"])):  # a longer window than it keeps
        with pytest.raises(DataContractError, match="rebuild it with this config"):
            H.read(spark, str(tmp_path / "h"), other)


def test_storage_reads_hadoop_qualified_file_urls_as_local_paths(tmp_path):
    """Spark qualifies local paths as ``file:/x`` (one slash); storage must write there, not under a
    relative directory named ``file:`` (which is where prepare's history metadata once went)."""
    from downpour import storage

    url = f"file:{tmp_path}/d"
    assert storage.is_local(url) and storage.local_path(url) == f"{tmp_path}/d"
    storage.write_json_atomic(storage.join(url, "x.json"), {"a": 1})
    assert (tmp_path / "d" / "x.json").exists() and storage.exists(storage.join(url, "x.json"))
