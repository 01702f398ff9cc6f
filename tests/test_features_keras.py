"""Serving parity: Keras preprocessing built from FeatureState gives exactly the shard values Spark writes."""

from __future__ import annotations

import datetime as dt
import random

import numpy as np
import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

tf = pytest.importorskip("tensorflow")

from downpour.columns import internal_names  # noqa: E402
from downpour.config import load_config  # noqa: E402
from downpour.features.hashing import fingerprint64, hash_buckets  # noqa: E402
from downpour.features.keras_preprocessing import HashBucket, build_preprocessing, raw_input_signature  # noqa: E402
from downpour.features.state import FeatureState, serving_frame  # noqa: E402
from downpour.features.windows import add_window_features  # noqa: E402
from downpour.pipelines.serving import load_signature, serving_arrays  # noqa: E402 - what batch scoring feeds a signature


def _strings(seed: int = 5) -> list[str]:
    rnd = random.Random(seed)
    alphabet = "abcXYZ019 -_.é日ß\t"
    # every length class Fingerprint64 branches on: 0, 1-3, 4-7, 8-16, 17-32, 33-64, > 64 (and multiples of 64)
    lengths = list(range(0, 140)) + [191, 192, 193, 255, 256, 257, 1000]
    return ["".join(rnd.choice(alphabet) for _ in range(n)) for n in lengths]


def test_fingerprint64_and_buckets_match_tensorflow():
    strs = _strings()
    big = 2**63 - 1  # TF takes the bucket count as int64; two moduli pin down the full 64-bit value
    for n in (big, big - 24):
        want = tf.strings.to_hash_bucket_fast(strs, n).numpy().tolist()
        assert [fingerprint64(s.encode()) % n for s in strs] == want
    layer = HashBucket(2048)
    assert hash_buckets(strs, 2048) == layer(tf.constant(strs)).numpy().tolist()
    assert hash_buckets(["", None], 2048) == [0, 0]


def _compare(spark_pdf, keras_out, state, ids):
    for col in state.numeric_columns:
        np.testing.assert_allclose(np.asarray(keras_out[col].numpy(), dtype=np.float64),
                                   spark_pdf[col].to_numpy(dtype=np.float64), rtol=1e-6, atol=1e-6, err_msg=col)
        assert keras_out[col].dtype == tf.float32
    for col in [c["name"] for c in state.categorical + state.crosses]:
        assert keras_out[col].dtype == tf.int64
        got, want = keras_out[col].numpy(), spark_pdf[col].to_numpy()
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, f"{col}: rows {ids[bad[:5]].tolist()} keras {got[bad[:5]]} spark {want[bad[:5]]}"


def _parity(spark, df, state, raw_df=None):
    """Spark's shard columns (from the cleaned rows ``df``) vs the Keras preprocessing fed the serving
    form of the same rows before cleaning (``raw_df``, default ``df``), converted to arrays as batch
    scoring converts them (``pipelines.serving.serving_arrays`` with the exported signature's specs)."""
    shards = state.transform(df).toPandas().sort_values("row_id").reset_index(drop=True)
    raw_df = df if raw_df is None else raw_df
    raw = serving_frame(raw_df, state, keep=("row_id",)).toPandas().sort_values("row_id").reset_index(drop=True)
    assert shards["row_id"].tolist() == raw["row_id"].tolist()
    model = build_preprocessing(state)
    inputs = {k: tf.constant(v) for k, v in serving_arrays(raw, raw_input_signature(state)).items()}
    out = model(inputs)
    assert set(out) == set(shards.columns) - {"row_id", "label", "weight"}
    _compare(shards, out, state, raw["row_id"].to_numpy())
    return model, raw, out


FRAUD_ROWS = T.StructType([
    T.StructField(n, t) for n, t in [
        ("transaction_id", T.StringType()), ("event_ts", T.TimestampType()), ("card_id", T.StringType()),
        ("customer_id", T.StringType()), ("merchant_id", T.StringType()), ("merchant_category", T.StringType()),
        ("amount", T.DoubleType()), ("currency", T.StringType()), ("country", T.StringType()),
        ("device_id", T.StringType()), ("ip_country", T.StringType()), ("channel", T.StringType()),
        ("label", T.DoubleType()), ("row_id", T.StringType()), ("split", T.StringType()),
    ]
])


def fraud_like(spark, n: int = 300, seed: int = 11):
    """Cleaned fraud rows shaped like conf/fraud.yaml's (PII columns already dropped), with the dirt that
    survives cleaning: nulls, unseen categories, stray whitespace, unicode, equal timestamps."""
    rnd = random.Random(seed)
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    countries = ["US", "GB", "DE", "FR", "CA", "ES", "IT", "NL", "AU", "IN", "MX"]
    cats = ["grocery", "travel", "electronics", " fuel ", "Café", "gaming", "jewelry\u00a0"]
    rows = []
    for i in range(n):
        card = rnd.randrange(15)
        secs = rows[-1][1] if rows and i % 17 == 0 else rnd.randrange(0, 21 * 86400)  # some ties
        ts = secs if isinstance(secs, dt.datetime) else t0 + dt.timedelta(seconds=secs)
        home = countries[card % len(countries)]
        split = "train" if ts < t0 + dt.timedelta(days=14) else "val" if ts < t0 + dt.timedelta(days=17) else "test"
        rows.append((
            f"tx{i:05d}", ts, f"card{card}", None if i % 13 == 0 else f"cust{card // 2}",
            None if i % 29 == 0 else f"M{rnd.randrange(80):07d}", rnd.choice(cats + [None]),
            None if i % 31 == 0 else round(rnd.lognormvariate(3.5, 1.4), 2), rnd.choice(["USD", "EUR", "GBP"]),
            home, f"dev_{rnd.randrange(25):x}", rnd.choice([home, home, rnd.choice(countries), None, "ZZ"]),
            rnd.choice(["web", "pos", "app", ""]), float(rnd.random() < 0.1), f"tx{i:05d}", split,
        ))
    return spark.createDataFrame(rows, FRAUD_ROWS)


def test_spark_and_keras_agree_on_fraud_shaped_data(spark, conf_dir, tmp_path):
    # the real conf (hashed merchant_id, velocity windows, a timestamp, a cross); a small cross budget
    # makes the country x ip_country cross hashed, to cover both cross kinds with the Telco test
    cfg = load_config(conf_dir / "fraud.yaml", ["features.cross_buckets=50"])
    df = add_window_features(fraud_like(spark), cfg).persist()
    state = FeatureState.fit(df.where(F.col("split") == "train"), cfg)
    assert {c["kind"] for c in state.categorical} == {"vocab", "hash", "hour", "dow"}
    assert [c["kind"] for c in state.crosses] == ["hash"]
    assert len(state.window_features) == 17 and set(state.window_features) <= set(state.raw_inputs)
    model, raw, out = _parity(spark, df, state)
    df.unpersist()

    # the exported form: a SavedModel signature that takes the raw columns (as training.export builds
    # serving_default), loaded and fed as batch scoring loads and feeds it, gives the same tensors
    module = tf.Module()
    module.pre = model

    @tf.function
    def serving_default(**raw_columns):
        return module.pre(raw_columns)

    signature = serving_default.get_concrete_function(**raw_input_signature(state))
    tf.saved_model.save(module, str(tmp_path / "pre"), signatures={"serving_default": signature})
    fn, specs = load_signature(str(tmp_path / "pre"), "serving_default")
    again = fn(**{k: tf.constant(v) for k, v in serving_arrays(raw, specs).items()})
    for k, v in out.items():
        np.testing.assert_array_equal(again[k].numpy(), v.numpy(), err_msg=k)


def test_spark_and_keras_agree_on_the_telco_table(spark, conf_dir, telco_path):
    cfg = load_config(conf_dir / "crm_telco.yaml")
    names = internal_names(cfg.schema_)
    raw = spark.read.option("header", True).csv(str(telco_path))  # every column a string
    cols = []
    for col, typ in cfg.schema_.items():
        v = F.trim(F.col(col))
        cols.append(F.when(v != "", v).cast(typ).alias(names[col]))  # blank -> null: 11 TotalCharges
    typed = raw.select(*cols).select(
        "*", (F.col("churn") == "Yes").cast("double").alias("label"), F.sha2("customerid", 256).alias("row_id"),
        F.when(F.abs(F.hash("customerid")) % 10 < 7, "train").otherwise("test").alias("split"),
    ).persist()
    # what cleaning hands on for `TotalCharges: {action: impute, value: 0.0, flag: true}`
    clean = typed.withColumns({"totalcharges": F.coalesce("totalcharges", F.lit(0.0)),
                               "totalcharges__missing": F.col("totalcharges").isNull().cast("int")})
    state = FeatureState.fit(clean, cfg)
    assert {c["kind"] for c in state.crosses} == {"exact"}
    tc = next(n for n in state.numeric if n["source"] == "totalcharges")
    assert tc["impute"] == 0.0  # serving imputes what cleaning imputed, not the median
    assert {"name": "n__totalcharges__missing", "source": "totalcharges",
            "cleaning_flag": "totalcharges__missing"} in state.flags
    # serving gets the raw rows (blank TotalCharges as NaN) and must give the cleaned rows' shard values
    _parity(spark, clean, state, raw_df=typed)
    assert clean.agg(F.sum("totalcharges__missing")).first()[0] == 11
    typed.unpersist()
