"""FeatureState: fitted on train only, out-of-vocabulary and null handling, shard schema, JSON round trip."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

from downpour.config import config_from_dict
from downpour.errors import ConfigError, DataContractError
from downpour.features.state import FeatureState
from downpour.storage import HadoopFS

SCHEMA = {"Customer ID": "string", "Monthly Charges": "double", "tenure": "int", "Contract": "string",
          "Payment Method": "string", "SeniorCitizen": "int", "signup_ts": "timestamp", "Churn": "string",
          "w": "double"}


def make_cfg(cleaning=None, **features):
    feats = {
        "numeric": [{"column": "Monthly Charges", "transform": "standardize"},
                    {"column": "tenure", "transform": "log1p", "clip_quantiles": [0.0, 1.0]},
                    {"column": "SeniorCitizen", "transform": "none", "clip_quantiles": None, "missing_flag": False}],
        "categorical": [{"column": "Contract", "top_k": 2, "min_count": 2},
                        {"column": "Payment Method", "encoding": "hash", "buckets": 16, "embedding_dim": 3}],
        "timestamp": ["signup_ts"],
        "crosses": [["Contract", "Payment Method"]],
        "weight_column": "w",
        **features,
    }
    return config_from_dict({
        "name": "s", "input": {"path": "/data/crm.csv"}, "schema": SCHEMA, "id_column": "Customer ID",
        "label": {"column": "Churn", "positive": "Yes"}, "features": feats, "output": {"path": "/tmp/out"},
        "cleaning": cleaning or {},
    })


FRAME = T.StructType([
    T.StructField("row_id", T.StringType()), T.StructField("split", T.StringType()),
    T.StructField("label", T.DoubleType()), T.StructField("weight", T.DoubleType()),
    T.StructField("monthly_charges", T.DoubleType()), T.StructField("tenure", T.IntegerType()),
    T.StructField("contract", T.StringType()), T.StructField("payment_method", T.StringType()),
    T.StructField("seniorcitizen", T.IntegerType()), T.StructField("signup_ts", T.TimestampType()),
])
MONDAY_1305 = dt.datetime(2024, 1, 1, 13, 5, tzinfo=dt.UTC)

TRAIN = [
    # contract counts: Month-to-month 5, One year 3, Two year 3, Rare 1 (below min_count 2)
    ("Month-to-month", 20.0, 1), ("Month-to-month", 30.0, 5), ("Month-to-month", 40.0, 10),
    ("Month-to-month", 50.0, 2), ("Month-to-month", None, 0), ("One year", 60.0, 20), ("One year", 70.0, 30),
    ("One year", 80.0, 40), ("Two year", 90.0, 50), ("Two year", 100.0, 60), ("Two year", 110.0, 70),
    ("Rare", 120.0, 72),
]


def frame(spark, other=None):
    rows = [(f"t{i}", "train", float(i % 2), 1.0, mc, ten, c, f"pm{i % 3}", i % 2, MONDAY_1305)
            for i, (c, mc, ten) in enumerate(TRAIN)]
    other = other if other is not None else [
        ("v0", "val", 1.0, 2.0, 65.0, 3, "One year", "pm1", 0, MONDAY_1305),
        ("x0", "test", 0.0, 1.0, 75.0, 4, "Two year", "pm2", 1, MONDAY_1305),
    ]
    return spark.createDataFrame(rows + other, FRAME)


def test_statistics_come_from_the_train_split_only(spark):
    cfg = make_cfg()
    state = FeatureState.fit(frame(spark), cfg)
    # val/test rows with wild values and unseen categories change nothing
    wild = [("v0", "val", 1.0, 9.0, 1e9, 10**6, "Brand new", "pmX", 1, dt.datetime(2030, 5, 5)),
            ("v1", "val", 1.0, 9.0, None, None, None, None, None, None)]
    wild += [(f"x{i}", "test", 0.0, 1.0, -5e8, -3, "Two year", "pmY", 0, MONDAY_1305) for i in range(30)]
    assert FeatureState.fit(frame(spark, wild), cfg).to_dict() == state.to_dict()
    assert state.fitted_rows == len(TRAIN)

    num = {n["source"]: n for n in state.numeric}
    mc = np.array([r[1] for r in TRAIN if r[1] is not None])
    mc_imputed = np.append(mc, num["monthly_charges"]["impute"])
    assert num["monthly_charges"]["impute"] in mc  # the median is an observed train value
    assert num["monthly_charges"]["clip"] == [20.0, 120.0]  # 0.001 / 0.999 quantiles of 11 values
    assert num["monthly_charges"]["mean"] == pytest.approx(mc_imputed.mean())
    assert num["monthly_charges"]["std"] == pytest.approx(mc_imputed.std())
    tl = np.log1p(np.array([r[2] for r in TRAIN], dtype=float))
    assert num["tenure"]["clip"] == [0.0, 72.0]
    assert (num["tenure"]["mean"], num["tenure"]["std"]) == (pytest.approx(tl.mean()), pytest.approx(tl.std()))
    assert (num["seniorcitizen"]["mean"], num["seniorcitizen"]["std"], num["seniorcitizen"]["clip"]) == (0, 1, None)
    cats = {c["name"]: c for c in state.categorical}
    # top 2 by count (ties by value); "Rare" is below min_count anyway
    assert cats["c__contract"]["vocab"] == ["Month-to-month", "One year"]
    assert cats["c__contract"]["cardinality"] == 3
    assert (cats["c__payment_method"]["cardinality"], cats["c__payment_method"]["embedding_dim"]) == (16, 3)
    assert state.crosses == [{"name": "c__contract_x_payment_method", "sources": ["c__contract", "c__payment_method"],
                              "cardinalities": [3, 16], "kind": "exact", "cardinality": 48}]
    assert state.raw_inputs == {"monthly_charges": "float64", "tenure": "float64", "seniorcitizen": "float64",
                                "contract": "string", "payment_method": "string", "signup_ts": "int64"}


def test_transform_gives_the_shard_schema_with_oov_and_nulls_handled(spark):
    cfg = make_cfg()
    state = FeatureState.fit(frame(spark), cfg)
    probe = [
        ("p0", "test", 1.0, 2.0, None, 5, " One year\t", "pm1", 1, MONDAY_1305),      # trimmed -> in vocab
        ("p1", "test", 0.0, 1.0, float("nan"), None, "Two year", None, None, None),  # OOV by top_k; nulls
        ("p2", "test", 0.0, 1.0, 1e6, 10**6, "", "", 0, dt.datetime(2024, 1, 7, 23, 59, 59)),  # Sunday
        ("p3", "test", 0.0, 1.0, 55.0, -1, None, "pm2", 0, MONDAY_1305),
        ("x0", "test", 0.0, 1.0, 75.0, 4, "Two year", "pm2", 1, MONDAY_1305),
    ]
    out = state.transform(frame(spark, probe).where(F.col("split") == "test"))
    assert out.columns == ["row_id", "label", "weight", "n__monthly_charges", "n__monthly_charges__missing",
                           "n__tenure", "n__tenure__missing", "n__seniorcitizen", "c__contract",
                           "c__payment_method", "c__signup_ts_hour", "c__signup_ts_dow", "c__contract_x_payment_method"]
    types = dict(out.dtypes)
    assert types["row_id"] == "string"
    assert {types[c] for c in out.columns if c.startswith("n__") or c in ("label", "weight")} == {"float"}
    assert {types[c] for c in out.columns if c.startswith("c__")} == {"bigint"}
    r = {row["row_id"]: row for row in out.collect()}
    assert set(r) == {"p0", "p1", "p2", "p3", "x0"}
    num = {n["source"]: n for n in state.numeric}
    mcs = num["monthly_charges"]
    # null and NaN: imputed with the train median and flagged
    imputed = (mcs["impute"] - mcs["mean"]) / mcs["std"]
    for k in ("p0", "p1"):
        assert r[k]["n__monthly_charges"] == pytest.approx(imputed, rel=1e-6)
        assert r[k]["n__monthly_charges__missing"] == 1.0
    assert r["p3"]["n__monthly_charges__missing"] == 0.0
    # clipped at the fitted bounds
    assert r["p2"]["n__monthly_charges"] == pytest.approx((120.0 - mcs["mean"]) / mcs["std"], rel=1e-6)
    assert r["p2"]["n__tenure"] == pytest.approx((np.log1p(72.0) - num["tenure"]["mean"]) / num["tenure"]["std"],
                                                 rel=1e-6)
    assert r["p3"]["n__tenure"] == pytest.approx((0.0 - num["tenure"]["mean"]) / num["tenure"]["std"], rel=1e-6)
    # seniorcitizen: no flag configured, null -> the median
    assert r["p1"]["n__seniorcitizen"] == num["seniorcitizen"]["impute"]
    # vocabulary: 0 = out of vocabulary / null / blank
    assert [r[k]["c__contract"] for k in ("p0", "p1", "p2", "p3", "x0")] == [2, 0, 0, 0, 0]
    # hashing: 0 only for null/blank, the same value always in the same bucket
    assert r["p1"]["c__payment_method"] == 0 and r["p2"]["c__payment_method"] == 0
    assert 1 <= r["p0"]["c__payment_method"] < 16 and r["p3"]["c__payment_method"] == r["x0"]["c__payment_method"]
    # timestamps: 1 + hour (UTC), 1 + day of week (Monday = 1); null -> 0
    assert (r["p0"]["c__signup_ts_hour"], r["p0"]["c__signup_ts_dow"]) == (14, 1)
    assert (r["p2"]["c__signup_ts_hour"], r["p2"]["c__signup_ts_dow"]) == (24, 7)
    assert (r["p1"]["c__signup_ts_hour"], r["p1"]["c__signup_ts_dow"]) == (0, 0)
    assert r["p0"]["c__contract_x_payment_method"] == 2 * 16 + r["p0"]["c__payment_method"]
    assert r["p0"]["weight"] == 2.0 and r["p0"]["label"] == 1.0


def test_json_round_trip_and_save_load(spark, tmp_path, monkeypatch):
    cfg = make_cfg(cross_buckets=20)  # 3 x 16 = 48 > 20: the cross is hashed
    state = FeatureState.fit(frame(spark), cfg)
    assert state.crosses[0]["kind"] == "hash" and state.crosses[0]["cardinality"] == 20
    d = state.to_dict()
    assert FeatureState.from_dict(json.loads(json.dumps(d))).to_dict() == d
    assert FeatureState.from_json(state.to_json()) == state
    local = tmp_path / "prepared" / "feature_state.json"
    state.save(str(local))
    assert FeatureState.load(str(local)) == state
    assert FeatureState.load(f"file://{local}") == state
    url = f"file://{tmp_path}/hadoop/feature_state.json"  # the Hadoop FileSystem path (hdfs://, s3a://...)
    HadoopFS(spark).write_bytes(url, state.to_json().encode())
    assert FeatureState.from_json(HadoopFS(spark).read_bytes(url).decode()) == state
    loaded = FeatureState.load(str(local))
    a = state.transform(frame(spark)).orderBy("row_id").collect()
    monkeypatch.setattr("downpour.features.state.SMALL_VOCAB", 0)  # large-vocabulary path: broadcast joins
    b = loaded.transform(frame(spark)).orderBy("row_id").collect()
    assert a == b
    assert all(0 <= row["c__contract_x_payment_method"] < 20 for row in a)
    with pytest.raises(DataContractError, match="version"):
        FeatureState.from_dict({**d, "version": 99})
    with pytest.raises(DataContractError, match="no such file"):
        FeatureState.load(str(tmp_path / "missing.json"))


def test_config_and_data_errors_name_the_column(spark):
    df = frame(spark)
    bad_cat = make_cfg(categorical=["Monthly Charges"], crosses=[])
    with pytest.raises(ConfigError, match=r"features.categorical\[0\].*Monthly Charges"):
        FeatureState.fit(df, bad_cat)
    bad_cross = make_cfg(crosses=[["Contract", "tenure"]])
    with pytest.raises(ConfigError, match=r"features.crosses\[0\]\[1\]"):
        FeatureState.fit(df, bad_cross)
    twice = make_cfg(categorical=[{"column": "Contract"}, {"column": "Contract", "top_k": 5}], crosses=[])
    with pytest.raises(ConfigError, match="two features would both be named 'c__contract'"):
        FeatureState.fit(df, twice)
    cfg = make_cfg()
    with pytest.raises(DataContractError, match="contract"):
        FeatureState.fit(df.drop("contract"), cfg)
    with pytest.raises(DataContractError, match="train split is empty"):
        FeatureState.fit(df.where(F.col("split") == "val"), cfg)


def test_cleaning_imputes_and_flags_carry_over(spark):
    """Nulls that cleaning imputed (and flagged) keep their flag in the shards, and serving imputes the
    same value cleaning did: a given value, or the statistic learned from the flagged train rows."""
    cfg = make_cfg(cleaning={"nulls": {"Monthly Charges": {"action": "impute", "value": 0.0, "flag": True},
                                       "Contract": {"action": "impute", "statistic": "mode", "flag": True}}},
                   crosses=[])
    df = frame(spark).withColumns({
        "monthly_charges__missing": F.col("monthly_charges").isNull().cast("int"),
        "monthly_charges": F.coalesce("monthly_charges", F.lit(0.0)),
        "contract__missing": (F.col("row_id") == "t11").cast("int"),  # cleaning filled "Rare" here
    })
    state = FeatureState.fit(df, cfg)
    mc = next(n for n in state.numeric if n["source"] == "monthly_charges")
    assert mc["impute"] == 0.0
    assert {"name": "n__monthly_charges__missing", "source": "monthly_charges",
            "cleaning_flag": "monthly_charges__missing"} in state.flags
    assert next(c for c in state.categorical if c["name"] == "c__contract")["impute"] == "Rare"
    rows = {r["row_id"]: r for r in state.transform(df).collect()}
    assert rows["t4"]["n__monthly_charges__missing"] == 1.0  # the imputed row keeps its flag
    assert rows["t3"]["n__monthly_charges__missing"] == 0.0
    assert rows["t4"]["n__monthly_charges"] == pytest.approx((0.0 - mc["mean"]) / mc["std"], rel=1e-6)


# "à" (C3 A0) and "†" (E2 80 A0) end in the byte of U+00A0's C2 A0: whole characters are stripped, not bytes
_TRIM_VALUES = [" a ", "\u00a0b\t", "\r\nc d\n", " \t\r\n\u00a0", "", "Café\u00a0", "x\u00a0y", None, "plain",
                "\u00e0", " \u2020x\u2020 ", "\U0001f600\u00a0"]


def _trim_disagreements(spark) -> tuple[list[str | None], list[int]]:
    """The feature state's Spark category strings of ``_TRIM_VALUES``, and the indices where they differ
    from the Python normalisation or the Keras layers' RE2 pattern."""
    import tensorflow as tf

    from downpour.features.state import TRIM_PATTERN, _category_string, _normalize

    strings = {"trim": True, "lower": False}
    df = spark.createDataFrame([(i, v) for i, v in enumerate(_TRIM_VALUES)], "i int, v string")
    got = [r[0] for r in df.orderBy("i").select(_category_string("v", "string", strings)).collect()]
    tf_trimmed = [t.decode() or None for t in tf.strings.regex_replace(
        tf.constant([v or "" for v in _TRIM_VALUES]), TRIM_PATTERN, "").numpy()]
    bad = [i for i, v in enumerate(_TRIM_VALUES)
           if got[i] != _normalize(v, "string", strings) or (got[i] or None) != tf_trimmed[i]]
    return got, bad


def test_the_spark_category_trim_strips_what_the_python_and_tensorflow_trims_strip(spark):
    """The category string Spark computes (``btrim``) equals the Python normalisation (``str.strip``)
    and the Keras layers' RE2 pattern, for values cleaning never saw (each whitespace character, inside
    and around, alone, and unicode): the feature state's own trim, not the cleaning stage's, is tested."""
    from downpour.features.state import WHITESPACE

    got, bad = _trim_disagreements(spark)
    assert bad == []
    assert got[:4] == ["a", "b", "c d", None] and got[6] == "x\u00a0y" and WHITESPACE.startswith(" ")
    assert got[9:] == ["\u00e0", "\u2020x\u2020", "\U0001f600"]


def test_with_spark_s_plain_trim_the_category_strings_disagree_with_serving(spark, monkeypatch):
    """Companion: Spark's ``trim`` strips spaces only; with it in place of ``btrim`` over the
    whitespace class, the check above finds the tab, newline and no-break-space values."""
    from pyspark.sql import functions as F

    monkeypatch.setattr(F, "btrim", lambda s, _chars: F.trim(s))
    _, bad = _trim_disagreements(spark)
    assert set(bad) >= {1, 2, 3, 5, 11}


def test_the_fitted_state_does_not_move_with_the_partitioning(spark):
    """60,000 train rows in 1 and in 7 shuffled partitions fit the same state, to the last digit
    (features/exact.py). The companions: Spark's approxQuantile and avg / stddev_pop, which the fit used
    before, give those frames different quantiles and moments, so this test would fail with them."""
    rng = np.random.default_rng(5)
    rows = [(f"t{i}", "train", float(i % 2), 1.0, float(rng.lognormal(4, 1)), int(rng.integers(0, 73)),
             "One year", f"pm{i % 3}", i % 2, MONDAY_1305) for i in range(60_000)]
    base = spark.createDataFrame(rows, FRAME)
    one, seven = base.repartition(1), base.repartition(7).sortWithinPartitions(F.rand(1))
    cfg = make_cfg()
    assert FeatureState.fit(one, cfg).to_dict() == FeatureState.fit(seven, cfg).to_dict()
    probs = [k / 20 for k in range(1, 20)]
    assert one.approxQuantile("monthly_charges", probs, 0.001) != seven.approxQuantile("monthly_charges", probs, 0.001)
    moments = [f.agg(F.avg("monthly_charges"), F.stddev_pop("monthly_charges")).first() for f in (one, seven)]
    assert moments[0] != moments[1]


def test_a_shared_quantile_table_fits_the_same_state_and_is_what_the_fit_reads(spark):
    """Prepare computes one exact quantile table for the feature fit and the drift reference together
    (features/exact.py ``table``). Fitted from that table the state is the state the fit computes on its
    own, a table lacking a probability the fit reads is not used, and the companion shows the table is
    read: a doctored median moves the state."""
    from downpour.features import drift, exact

    df = frame(spark).where(F.col("split") == "train")  # the table is of the rows the fit reads
    cfg = make_cfg(numeric=[{"column": "Monthly Charges", "clip_quantiles": [0.05, 0.95]}, "tenure"])
    wanted = FeatureState.quantiles_wanted(df, cfg)
    assert wanted["monthly_charges"] == {0.0, 0.5, 1.0, 0.05, 0.95} and 0.5 in wanted["tenure"]
    known = exact.table(df, wanted, drift.quantiles_wanted(cfg))
    alone = FeatureState.fit(df, cfg).to_dict()
    assert FeatureState.fit(df, cfg, known).to_dict() == alone
    lacking = {c: {p: v for p, v in q.items() if p != 0.95} for c, q in known.items()}
    assert FeatureState.fit(df, cfg, lacking).to_dict() == alone
    doctored = {c: dict(q) for c, q in known.items()}
    doctored["tenure"][0.5] += 1.0
    fitted = FeatureState.fit(df, cfg, doctored).to_dict()
    assert [n["impute"] for n in fitted["numeric"]] != [n["impute"] for n in alone["numeric"]]


def test_the_feature_fit_and_the_drift_reference_share_their_passes(spark):
    """prepare runs the feature fit and the drift reference through one ``Passes`` (features/passes.py):
    one aggregation and one grouped count of values for both. Each comes out as it does alone, in fewer
    Spark jobs, and the one count keeps the vocabulary (normalized values) apart from the reference's
    values (raw, as scoring compares them). Companion: aggregations or value counts of two fits that
    share a name are refused, never mixed up in one row."""
    from downpour.features import drift, exact
    from downpour.features.passes import Passes, TopValues

    cfg = make_cfg(cleaning={"lowercase_categoricals": True},
                   categorical=[{"column": "Contract", "top_k": 2, "min_count": 2},
                                {"column": "Payment Method", "top_k": 1, "min_count": 1}])  # rules per column
    base = frame(spark).where(F.col("split") == "train")
    df = base.unionByName(base.where(F.col("contract") == "One year").withColumn("contract", F.lit("ONE YEAR")))
    known = exact.table(df, FeatureState.quantiles_wanted(df, cfg), drift.quantiles_wanted(cfg))
    sc = spark.sparkContext

    def jobs(group, fit):
        sc.setJobGroup(group, group)
        try:
            return fit(), len(sc.statusTracker().getJobIdsForGroup(group))
        finally:
            sc.setLocalProperty("spark.jobGroup.id", None)

    def shared():
        passes = Passes()
        state_of = FeatureState.fitting(df, cfg, known, passes)
        reference_of = drift.reference_fitting(df, cfg, known, passes)
        counted = passes.run(df)
        return state_of(counted), reference_of(counted)

    (alone_state, alone_ref), apart = jobs("apart", lambda: (FeatureState.fit(df, cfg, known),
                                                             drift.fit_reference(df, cfg, known)))
    (state, ref), together = jobs("together", shared)
    assert state == alone_state and ref == alone_ref
    assert 0 < together < apart
    assert next(c for c in state.categorical if c["name"] == "c__contract")["vocab"] == ["one year", "month-to-month"]
    assert ref["categorical"]["Contract"]["values"] == ["Month-to-month", "ONE YEAR"]
    assert next(c for c in state.categorical if c["name"] == "c__payment_method")["vocab"] == ["pm0"]  # 5 each
    assert ref["categorical"]["Payment Method"]["values"] == ["pm0"]
    assert ref["numeric"]["Monthly Charges"]["shares"] == alone_ref["numeric"]["Monthly Charges"]["shares"]

    clash = Passes()
    clash.aggregate(F.count(F.lit(1)).alias("rows"))
    FeatureState.fitting(df, cfg, known, clash)  # its row count is named "rows" too
    with pytest.raises(ValueError, match="two aggregations are named 'rows'"):
        clash.run(df)
    twice = Passes()
    twice.top_values(TopValues("k", F.col("contract"), 1, 5))
    with pytest.raises(ValueError, match="asked for twice"):
        twice.top_values(TopValues("k", F.col("payment_method"), 1, 5))
