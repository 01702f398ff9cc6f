"""Window features: point-in-time velocity and RFM values on hand-built histories, and hot-key splitting."""

from __future__ import annotations

import datetime as dt
import random
import time

import pytest
from pyspark.sql import types as T

from downpour.columns import internal_names
from downpour.config import config_from_dict
from downpour.errors import ConfigError
from downpour.features.windows import _hot_keys, add_window_features, window_features

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
H, D = 3600, 86400

FRAUD_SCHEMA = {"transaction_id": "string", "event_ts": "timestamp", "card_id": "string",
                "Customer ID": "string", "amount": "double", "device_id": "string", "ip_country": "string",
                "is_fraud": "int"}


def fraud_cfg(**velocity):
    vel = {"enabled": True, "entities": ["card_id", "Customer ID"], "amount_column": "amount",
           "windows": ["1h", "24h", "7d"], "device_column": "device_id", "country_column": "ip_country",
           **velocity}
    return config_from_dict({
        "name": "t", "input": {"path": "/data/tx.csv"}, "schema": FRAUD_SCHEMA, "id_column": "transaction_id",
        "timestamp_column": "event_ts", "label": {"column": "is_fraud"},
        "features": {"numeric": ["amount"], "velocity": vel}, "output": {"path": "/tmp/out"},
    })


def tx_frame(spark, rows):
    """rows: (id, card, customer, seconds after T0, amount, device, country) -> safe-named DataFrame."""
    schema = T.StructType([
        T.StructField("transaction_id", T.StringType()), T.StructField("event_ts", T.TimestampType()),
        T.StructField("card_id", T.StringType()), T.StructField("customer_id", T.StringType()),
        T.StructField("amount", T.DoubleType()), T.StructField("device_id", T.StringType()),
        T.StructField("ip_country", T.StringType()),
    ])
    data = [(i, T0 + dt.timedelta(seconds=s), card, cust, amt, dev, ctry) for i, card, cust, s, amt, dev, ctry in rows]
    return spark.createDataFrame(data, schema)


HISTORY = [
    # id,  card, customer, seconds, amount, device, country
    ("a1", "A", "C1", 0, 10.0, "d1", "US"),
    ("b1", "B", "C1", 20 * 60, 1000.0, "d9", "FR"),
    ("a2", "A", "C1", 30 * 60, 20.0, "d1", "US"),
    ("a3", "A", "C1", 30 * 60, 40.0, "d2", "US"),        # same second as a2: neither sees the other
    ("a4", "A", None, 90 * 60, 5.0, "d1", "GB"),          # no customer: customer features are null
    ("a5", "A", "C1", 25 * H, 100.0, "d3", "US"),
    ("a6", "A", "C1", 9 * D, 7.0, "d1", "US"),
]

# Every velocity value of card A, worked out by hand. Windows are [t - w, t) over strictly earlier events.
EXPECTED_A = {
    #      count 1h/24h/7d    sum 1h/24h/7d            secs since prev   amount/7d mean  first dev, ctry
    "a1": ((0, 0, 0), (0.0, 0.0, 0.0), None, None, 1.0, 1.0),
    "a2": ((1, 1, 1), (10.0, 10.0, 10.0), 1800.0, 2.0, 0.0, 0.0),
    "a3": ((1, 1, 1), (10.0, 10.0, 10.0), 1800.0, 4.0, 1.0, 0.0),
    "a4": ((2, 3, 3), (60.0, 70.0, 70.0), 3600.0, 5.0 / (70.0 / 3), 0.0, 1.0),
    "a5": ((0, 1, 4), (0.0, 5.0, 75.0), 23.5 * H, 100.0 / (75.0 / 4), 1.0, 0.0),
    "a6": ((0, 0, 0), (0.0, 0.0, 0.0), 9 * D - 25 * H, None, 0.0, 0.0),
}


def _approx(a, b):
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) < 1e-9)


def test_velocity_values_are_point_in_time(spark):
    cfg = fraud_cfg(hot_key_rows=None)
    names = internal_names(cfg.schema_)
    assert names["Customer ID"] == "customer_id"
    out = {r["transaction_id"]: r.asDict() for r in add_window_features(tx_frame(spark, HISTORY), cfg).collect()}
    assert len(out) == len(HISTORY)
    for tid, (counts, sums, since, ratio, first_dev, first_ctry) in EXPECTED_A.items():
        r = out[tid]
        for w, c, s in zip(["1h", "24h", "7d"], counts, sums, strict=True):
            assert r[f"vel_card_id_count_{w}"] == c, (tid, w)
            assert r[f"vel_card_id_sum_{w}"] == s, (tid, w)
        assert _approx(r["vel_card_id_secs_since_prev"], since), tid
        assert _approx(r["vel_card_id_amount_over_mean_7d"], ratio), tid
        assert r["vel_card_id_first_device"] == first_dev, tid
        assert r["vel_card_id_first_country"] == first_ctry, tid
    # customer C1 sees card B's event too; a2 and a3 (same second) still do not see each other
    assert out["a2"]["vel_customer_id_count_1h"] == 2 and out["a2"]["vel_customer_id_sum_1h"] == 1010.0
    assert out["a3"]["vel_customer_id_count_1h"] == 2
    assert out["a5"]["vel_customer_id_count_24h"] == 0  # a4 has no customer, so it is in no customer history
    assert out["a5"]["vel_customer_id_secs_since_prev"] == 25 * H - 30 * 60
    assert all(out["a4"][f"vel_customer_id_{k}"] is None for k in ("count_1h", "sum_7d", "secs_since_prev"))
    # only the first entity gets the ratio and first-time flags
    assert "vel_customer_id_first_device" not in out["a1"]
    assert list(out["a1"])[: len(HISTORY[0])] == ["transaction_id", "event_ts", "card_id", "customer_id",
                                                  "amount", "device_id", "ip_country"]
    assert [f.name for f in window_features(cfg)] == list(out["a1"])[7:]


def _random_history(seed: int) -> list[tuple]:
    """A hot card H (many events over 40 days, with ties and a 10-day silence) and a few quiet cards."""
    rnd = random.Random(seed)
    rows, i = [], 0
    t = 0
    for k in range(120):
        t += rnd.choice([0, 0, 60, 600, 3 * H, 20 * H]) if k != 60 else 10 * D  # the silence crosses buckets
        rows.append((f"h{i}", "H", rnd.choice(["C1", "C2", None]), t, round(rnd.uniform(1, 500), 2),
                     rnd.choice(["d1", "d2", "d3", None]), rnd.choice(["US", "GB", "FR"])))
        i += 1
    for card in ("Q1", "Q2", "Q3"):
        for _ in range(8):
            rows.append((f"q{i}", card, "C2", rnd.randint(0, 45 * D), 10.0, "d1", "US"))
            i += 1
    return rows


def _brute_force(rows: list[tuple], windows: list[int]) -> dict[str, dict[str, float]]:
    """Reference velocity values for card_id, straight from the definition."""
    out = {}
    for tid, card, _, t, _amount, _, _ in rows:
        earlier = [r for r in rows if r[1] == card and r[3] < t]
        vals: dict[str, float] = {}
        for w in windows:
            inside = [r for r in earlier if r[3] >= t - w]
            vals[f"count_{w}"] = float(len(inside))
            vals[f"sum_{w}"] = float(sum(r[4] for r in inside))
        vals["since"] = float(t - max(r[3] for r in earlier)) if earlier else None
        out[tid] = vals
    return out


def test_hot_key_time_buckets_give_the_same_values(spark):
    rows = _random_history(7)
    df = tx_frame(spark, rows)
    whole = fraud_cfg(hot_key_rows=None)
    split = fraud_cfg(hot_key_rows=20, hot_key_bucket="7d")  # H (120 rows) is hot: ~6 buckets of 7 days
    assert _hot_keys(df, [("card_id", 20), ("customer_id", 1000)]) == {0: ["H"]}
    a = {r["transaction_id"]: r.asDict() for r in add_window_features(df, whole).collect()}
    b = {r["transaction_id"]: r.asDict() for r in add_window_features(df, split).collect()}
    assert a.keys() == b.keys() and len(a) == len(rows)
    for tid in a:
        for k, v in a[tid].items():
            assert _approx(v, b[tid][k]) if isinstance(v, float) else v == b[tid][k], (tid, k)
    ref = _brute_force(rows, [H, 24 * H, 7 * D])
    for tid, vals in ref.items():
        for w, label in ((H, "1h"), (24 * H, "24h"), (7 * D, "7d")):
            assert b[tid][f"vel_card_id_count_{label}"] == vals[f"count_{w}"], (tid, label)
            assert _approx(b[tid][f"vel_card_id_sum_{label}"], vals[f"sum_{w}"]), (tid, label)
        assert _approx(b[tid]["vel_card_id_secs_since_prev"], vals["since"]), tid
    # the 10-day silence: the first event after it finds its predecessor in an earlier bucket
    assert max(r["vel_card_id_secs_since_prev"] or 0 for r in b.values()) >= 10 * D


def test_a_row_bound_leaves_out_only_the_entities_no_key_can_make_hot(spark):
    """A key cannot have more rows than the frame has: given that bound, an entity whose threshold is not
    below it is not counted, and with none left the pass is skipped. Above the bound a hot key is still
    found."""
    df = tx_frame(spark, _random_history(7))  # 144 rows, card H 120 of them
    n = df.count()
    sc = spark.sparkContext
    assert _hot_keys(df, [("card_id", 20), ("customer_id", 1000)], rows=n) == {0: ["H"]}
    assert _hot_keys(df, [("card_id", 119), ("customer_id", n)], rows=n) == {0: ["H"]}  # just below: counted
    tracker = sc.statusTracker()
    try:
        sc.setJobGroup("hot-bound", "the hot-key count under a row bound")
        assert _hot_keys(df, [("card_id", n), ("customer_id", 1000)], rows=n) == {}
        # the companion: without the bound the same plans do run the pass (and find no hot key); its jobs
        # are listed after any of the group above would be (the listener sees events in order)
        sc.setJobGroup("hot-unbounded", "the hot-key count without a bound")
        assert _hot_keys(df, [("card_id", n), ("customer_id", 1000)]) == {}
        for _ in range(100):
            if tracker.getJobIdsForGroup("hot-unbounded"):
                break
            time.sleep(0.1)
        assert list(tracker.getJobIdsForGroup("hot-unbounded")) != []
        assert list(tracker.getJobIdsForGroup("hot-bound")) == [], "no pass runs under the bound"
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
        sc.setLocalProperty("spark.job.description", None)


def test_keys_counted_over_a_superset_split_more_keys_and_change_no_value(spark, caplog):
    """``count_over`` (a cheaper frame with every entity value of the rows, maybe more, as scoring's
    input plus its whole history): the keys are counted there. Here every row twice: card H (120 rows,
    240 counted) is split only under ``count_over``, and every value stays what the whole history gives."""
    rows = _random_history(7)
    df = tx_frame(spark, rows)
    cfg = fraud_cfg(hot_key_rows=200, hot_key_bucket="7d")
    with caplog.at_level("WARNING", logger="downpour"):
        plain = {r["transaction_id"]: r.asDict() for r in add_window_features(df, cfg).collect()}
        assert not any("hot key(s) in" in r.getMessage() for r in caplog.records), "over df, H is not hot"
        split = {r["transaction_id"]: r.asDict()
                 for r in add_window_features(df, cfg, count_over=df.unionByName(df)).collect()}
    assert any("1 hot key(s) in 'card_id'" in r.getMessage() and "where an event may count twice" in r.getMessage()
               for r in caplog.records), "H is split, and the warning says its rows may be counted twice"
    assert plain.keys() == split.keys() and len(plain) == len(rows)
    for tid in plain:
        for k, v in plain[tid].items():
            assert _approx(v, split[tid][k]) if isinstance(v, float) else v == split[tid][k], (tid, k)
    with pytest.raises(ValueError, match="count_over has no column 'card_id'"):  # before any job
        add_window_features(df, cfg, count_over=df.drop("card_id"))


CRM_SCHEMA = {"customer_id": "string", "snapshot_date": "date", "signup_date": "date", "sessions": "int",
              "spend": "double", "churned": "int"}


def crm_cfg(**rfm):
    return config_from_dict({
        "name": "crm", "input": {"path": "/data/crm.parquet", "format": "parquet"}, "schema": CRM_SCHEMA,
        "timestamp_column": "snapshot_date", "label": {"column": "churned"},
        "features": {"numeric": ["spend"], "rfm": {"enabled": True, "entity": "customer_id", "amount_column": "spend",
                                                   "frequency_column": "sessions", "windows": ["28d", "89d"],
                                                   "signup_column": "signup_date", **rfm}},
        "output": {"path": "/tmp/out"},
    })


def test_rfm_values_per_snapshot(spark):
    months = [dt.date(2024, m, 28) for m in range(1, 7)]
    sessions = [10, 0, 0, 4, 6, 2]
    spend = [50.0, 0.0, 0.0, 20.0, 0.0, 30.0]
    data = [("K", d, dt.date(2023, 12, 1), s, m, 0) for d, s, m in zip(months, sessions, spend, strict=True)]
    data.append(("L", dt.date(2024, 1, 28), None, 0, 0.0, 1))  # never active, unknown signup
    df = spark.createDataFrame(data, "customer_id string, snapshot_date date, signup_date date, sessions int, "
                                     "spend double, churned int")
    for cfg in (crm_cfg(hot_key_rows=None), crm_cfg(hot_key_rows=3, hot_key_bucket="89d")):
        out = add_window_features(df, cfg)
        got = {(r["customer_id"], r["snapshot_date"]): r for r in out.collect()}
        k = [got[("K", d)] for d in months]
        # snapshots are 29-31 days apart: (t - 28d, t] holds this month only, (t - 89d, t] this
        # month and the two before
        assert [r["rfm_frequency_28d"] for r in k] == [10, 0, 0, 4, 6, 2]
        assert [r["rfm_frequency_89d"] for r in k] == [10, 10, 10, 4, 10, 12]
        assert [r["rfm_monetary_89d"] for r in k] == [50, 50, 50, 20, 20, 50]
        assert [r["rfm_recency_days"] for r in k] == [0, 31, 60, 0, 0, 0]
        assert [r["rfm_tenure_days"] for r in k] == [(d - dt.date(2023, 12, 1)).days for d in months]
        # trend: sessions per day this month over sessions per day in the rest of the 92 days
        assert k[0]["rfm_trend_28d_89d"] is None  # no older activity
        assert k[4]["rfm_trend_28d_89d"] == pytest.approx((6 / 28) / (4 / 61))
        lone = got[("L", dt.date(2024, 1, 28))]
        assert lone["rfm_recency_days"] is None and lone["rfm_tenure_days"] is None
        assert lone["rfm_frequency_28d"] == 0


def test_disabled_is_a_no_op_and_bad_types_are_reported(spark):
    cfg = fraud_cfg(enabled=False)
    df = tx_frame(spark, HISTORY[:2])
    assert add_window_features(df, cfg) is df
    from downpour.errors import DataContractError

    cfg = fraud_cfg(hot_key_rows=None)
    bad = df.withColumn("event_ts", df["event_ts"].cast("string"))
    with pytest.raises(DataContractError, match="event_ts"):
        add_window_features(bad, cfg)
    with pytest.raises(ConfigError, match="hot_key_bucket"):
        fraud_cfg(hot_key_bucket="1h")


def _constraints(plan) -> int:
    """How many predicates Spark's optimizer derived over every node of a (JVM) logical plan."""
    n, stack = 0, [plan]
    while stack:
        node = stack.pop()
        n += node.constraints().size()
        kids = node.children()
        stack.extend(kids.apply(i) for i in range(kids.size()))
    return n


def test_hot_keys_in_both_entities_of_a_wide_frame_plan_inside_a_stage(spark, tmp_path):
    """The hot-key path reuses each entity's input in a union and in joins, and with Spark's constraint
    propagation on, planning it grew with every input column: in a local run with hot keys in both
    entities, 3.5 s at 7 columns, 12 s at 11, and at 16 not done about 225 s in (or a driver out of heap).
    Stages run with the propagation off (``downpour/spark.py::persisting``): a 16-column frame with both
    entities hot plans, and every value is what the unsplit windows give.

    The companion: outside a stage the optimizer derives more than a hundred predicates for the 7-column
    frame's hot-key plan (428 in a local run); inside one, none for the 16-column frame's."""
    from pyspark.sql import functions as F

    from downpour.spark import CONSTRAINTS_KEY, persisting

    rows = _random_history(7)
    df = tx_frame(spark, rows)
    notes = [F.concat(F.col("transaction_id"), F.lit(f"-{i}")).alias(f"note_{i}") for i in range(9)]
    df.select("*", *notes).write.parquet(str(tmp_path / "wide"))
    wide = spark.read.parquet(str(tmp_path / "wide"))
    split = fraud_cfg(hot_key_rows=20, hot_key_bucket="7d")
    assert _hot_keys(df, [("card_id", 20), ("customer_id", 20)]).keys() == {0, 1}, "both entities have hot keys"
    whole = {r["transaction_id"]: r.asDict() for r in add_window_features(df, fraud_cfg(hot_key_rows=None)).collect()}
    assert spark.conf.get(CONSTRAINTS_KEY, None) is None
    outside = _constraints(add_window_features(df, split)._jdf.queryExecution().optimizedPlan())
    with persisting(spark):
        assert spark.conf.get(CONSTRAINTS_KEY) == "false"
        frame = add_window_features(wide, split)
        inside = _constraints(frame._jdf.queryExecution().optimizedPlan())
        got = {r["transaction_id"]: r.asDict() for r in frame.collect()}
    assert spark.conf.get(CONSTRAINTS_KEY, None) is None, "the session's own setting comes back"
    assert outside > 100 and inside == 0, (outside, inside)
    assert got.keys() == whole.keys() and len(got) == len(rows)
    names = [f.name for f in window_features(split)]
    for tid, vals in whole.items():
        for k in names:
            v = vals[k]
            assert _approx(v, got[tid][k]) if isinstance(v, float) else v == got[tid][k], (tid, k)
