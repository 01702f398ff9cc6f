"""Synthetic generators: deterministic, the declared schema, realistic structure, honest dirt, a safe CLI."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from downpour.config import load_config
from downpour.errors import ConfigError
from downpour.pipelines.generate import CRM_SCHEMA, FRAUD_SCHEMA, generate, luhn_valid, per_operator_codegen, write_raw

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / ".venv" / "bin" / "downpour"


def _checksum(df: DataFrame) -> tuple[int, int]:
    """Order-independent fingerprint of every value, computed in Spark: (rows, sum of row hashes)."""
    row = F.xxhash64(*[F.coalesce(F.col(c).cast("string"), F.lit("<null>")) for c in df.columns])
    r = df.agg(F.count(F.lit(1)).alias("n"), F.sum(row.cast("decimal(38,0)")).alias("s")).first()
    return r["n"], int(r["s"])


def _cached(df: DataFrame) -> DataFrame:
    with per_operator_codegen(df.sparkSession):     # as write_raw runs it: ~2.5x less CPU
        df = df.cache()
        df.count()
    return df


@pytest.fixture(scope="module")
def fraud50k(spark):
    df = _cached(generate(spark, "fraud", 50_000, seed=11))
    yield df
    df.unpersist()


@pytest.fixture(scope="module")
def fraud_dirty(spark):
    df = _cached(generate(spark, "fraud", 4000, seed=5, dirty_rate=0.1))
    yield df
    df.unpersist()


@pytest.fixture(scope="module")
def crm12k(spark):
    df = _cached(generate(spark, "crm", 12_000, seed=4))
    yield df
    df.unpersist()


def test_schema_matches_the_configs(spark, conf_dir, fraud50k, crm12k, fraud_dirty):
    """The generators emit exactly the columns, order and types the shipped configs declare."""
    for df, conf, schema in ((fraud50k, "fraud.yaml", FRAUD_SCHEMA), (crm12k, "crm.yaml", CRM_SCHEMA)):
        declared = load_config(conf_dir / conf).schema_
        assert list(declared.items()) == list(schema.items()), conf
        assert [(f.name, f.dataType.simpleString()) for f in df.schema.fields] == list(declared.items())
    for dirty, schema in ((fraud_dirty, FRAUD_SCHEMA), (generate(spark, "crm", 50, dirty_rate=0.2), CRM_SCHEMA)):
        assert dirty.columns == list(schema) and {t for _, t in dirty.dtypes} == {"string"}


def test_same_seed_same_rows_other_seed_differs(spark, fraud_dirty, crm12k):
    with per_operator_codegen(spark):
        a = _checksum(fraud_dirty)
        assert a == _checksum(generate(spark, "fraud", 4000, seed=5, dirty_rate=0.1)) and a[0] == 4000
        c = _checksum(generate(spark, "fraud", 4000, seed=6, dirty_rate=0.1))
        assert c[0] == 4000 and c[1] != a[1]
        d = _checksum(crm12k)
        assert d == _checksum(generate(spark, "crm", 12_000, seed=4)) and d[0] == 12_000


def test_fraud_population_and_rate(fraud50k):
    s = fraud50k.agg(
        F.count(F.lit(1)).alias("rows"), F.avg("is_fraud").alias("rate"),
        F.countDistinct("transaction_id").alias("ids"), F.countDistinct("customer_id").alias("customers"),
        F.countDistinct("card_id").alias("cards"), F.min("amount").alias("min_amount"),
        F.expr("percentile_approx(amount, 0.5)").alias("median"), F.max("amount").alias("max_amount"),
        F.min("event_ts").alias("t0"), F.max("event_ts").alias("t1"),
        F.sum(F.hour("event_ts").between(1, 4).cast("int")).alias("night"),
        F.sum(F.hour("event_ts").between(17, 20).cast("int")).alias("evening"),
        *[F.sum(F.col(c).isNull().cast("int")).alias(f"null_{c}") for c in FRAUD_SCHEMA],
    ).first()
    assert s["rows"] == s["ids"] == 50_000                 # exact size, unique ids when clean
    assert 0.003 <= s["rate"] <= 0.008                      # ~0.5% fraud
    assert 900 <= s["customers"] <= 1000                    # ~rows/50 customers ...
    assert s["customers"] * 1.15 <= s["cards"] <= s["customers"] * 1.5   # ... with 1-2 cards each
    assert 0.5 <= s["min_amount"] and 15 <= s["median"] <= 80 and s["max_amount"] > 20 * s["median"]
    assert (s["t1"] - s["t0"]).days >= 85                   # ~90 days
    assert s["evening"] > 5 * s["night"]                    # diurnal
    assert all(s[f"null_{c}"] == 0 for c in FRAUD_SCHEMA)


def test_card_numbers_are_luhn_valid_and_pii_looks_real(fraud50k):
    cards = fraud50k.select("card_id", "card_number", "email", "customer_name").distinct().collect()
    assert cards and all(len(r["card_number"]) == 16 and luhn_valid(r["card_number"]) for r in cards)
    assert len({r["card_number"] for r in cards}) == len({r["card_id"] for r in cards})   # one number per card
    assert all("@" in r["email"] and " " in r["customer_name"] for r in cards)
    assert luhn_valid("4539578763621486") and not luhn_valid("4539578763621487")


def test_fraud_lives_in_card_history_not_in_one_column(fraud50k):
    """Bursts are real (fraud rows share a card minutes apart), velocity and novelty features find
    fraud, and no single value of a categorical column gives it away."""
    ts = F.col("event_ts").cast("long")
    by_card = Window.partitionBy("card_id").orderBy(ts)
    d = fraud50k.select(
        "is_fraud", "channel", "merchant_category", "country", "ip_country", "merchant_id",
        F.count(F.lit(1)).over(by_card.rangeBetween(-3600, -1)).alias("n_1h"),
        F.row_number().over(Window.partitionBy("card_id", "device_id").orderBy(ts)).alias("dev_seen"),
        F.row_number().over(Window.partitionBy("card_id", "ip_country").orderBy(ts)).alias("ip_seen"),
    ).withColumn("signal", (F.col("n_1h") >= 2) | ((F.col("dev_seen") == 1) & (F.col("ip_seen") == 1)))
    s = d.agg(F.avg("is_fraud").alias("base"),
              F.avg(F.when(F.col("signal"), F.col("is_fraud"))).alias("flagged"),
              F.avg(F.when(F.col("is_fraud") == 1, F.col("signal").cast("int"))).alias("recall"),
              F.sum(F.when(F.col("is_fraud") == 1, (F.col("n_1h") >= 2).cast("int"))).alias("in_bursts")).first()
    assert s["in_bursts"] >= 40                                 # card-testing bursts on one card
    assert s["flagged"] >= 10 * s["base"] and s["recall"] >= 0.6
    cols = ("channel", "merchant_category", "country", "ip_country", "merchant_id")
    pairs = F.explode(F.array(*[F.struct(F.lit(c).alias("col"), F.col(c).alias("value")) for c in cols]))
    worst = dict(d.select("is_fraud", pairs.alias("p")).groupBy("p.col", "p.value")
                 .agg(F.count(F.lit(1)).alias("n"), F.avg("is_fraud").alias("rate")).where("n >= 100")
                 .groupBy("col").agg(F.max("rate")).collect())
    assert set(worst) == set(cols) and max(worst.values()) < 0.2, worst   # no value is a fraud flag


def test_dirty_rate_is_roughly_honoured(fraud_dirty):
    rows, df = 4000, fraud_dirty
    amount = F.expr("try_cast(amount AS DOUBLE)")
    bad = (amount.isNull() | (amount < 0) | (amount > 1e6) | F.expr("try_cast(is_fraud AS INT)").isNull()
           | F.to_timestamp("event_ts", "yyyy-MM-dd HH:mm:ss").isNull()
           | F.col("card_id").isNull() | F.col("customer_id").isNull())
    s = df.agg(F.count(F.lit(1)).alias("n"), F.sum(bad.cast("int")).alias("bad"),
               F.countDistinct("transaction_id").alias("ids"),
               F.sum((F.col("amount").rlike("^[0-9]+,[0-9]+x$")).cast("int")).alias("comma"),
               F.sum((F.col("event_ts") == "yesterday").cast("int")).alias("yesterday")).first()
    dups = s["n"] - s["ids"]
    later = df.groupBy("transaction_id").agg(F.countDistinct("event_ts").alias("k")).where("k > 1").count()
    assert s["n"] == rows
    assert 0.07 * rows <= s["bad"] + dups <= 0.13 * rows
    assert dups >= 0.01 * rows and later >= 1               # replays, some with a later timestamp
    assert s["comma"] >= 1 and s["yesterday"] >= 1


def test_crm_panel_label_rate_and_consistency(crm12k):
    df = crm12k
    w = Window.partitionBy("customer_id").orderBy("snapshot_date")
    d = df.withColumn("later", F.lead("snapshot_date").over(w)) \
        .withColumn("gap", F.months_between("later", "snapshot_date"))
    s = d.agg(F.count(F.lit(1)).alias("n"), F.avg("churned").alias("rate"),
              F.sum(((F.col("churned") == 1) & F.col("later").isNotNull()).cast("int")).alias("after_churn"),
              F.sum((F.col("gap") != 1).cast("int")).alias("holes"),
              F.sum((F.col("signup_date") > F.to_date("snapshot_date")).cast("int")).alias("early"),
              F.countDistinct("customer_id", "snapshot_date").alias("keys"),
              F.avg(F.when(F.col("complaints") > 0, F.col("churned"))).alias("rate_complained"),
              F.min("sessions").alias("min_sessions"), F.min("spend").alias("min_spend")).first()
    assert s["n"] == s["keys"] == 12_000                  # one row per customer-month
    assert 0.10 <= s["rate"] <= 0.20
    assert s["after_churn"] == 0 and s["holes"] == 0      # a churned customer never comes back
    assert s["early"] == 0 and s["min_sessions"] >= 0 and s["min_spend"] > 0
    assert s["rate_complained"] > 1.5 * s["rate"]         # complaints drive churn


def test_write_raw_csv_text_and_parquet_types(spark, crm12k, tmp_path):
    crm = crm12k
    write_raw(crm, str(tmp_path / "p"), fmt="parquet", rows=12_000)
    back = spark.read.parquet(str(tmp_path / "p"))
    assert dict(back.dtypes)["snapshot_date"] == "timestamp" and back.count() == 12_000
    write_raw(crm, str(tmp_path / "c"), fmt="csv", partitions=2)
    files = sorted((tmp_path / "c").glob("part-*.csv"))
    lines = [ln for f in files for ln in f.read_text().splitlines()]
    assert len(files) == 2 and lines[0].startswith("customer_id,customer_name,email,signup_date,snapshot_date")
    first = lines[1].split(",")
    assert len(first[4]) == 19 and first[4].endswith(" 00:00:00") and first[7].count(".") == 1
    with pytest.raises(ConfigError, match="--format"):
        write_raw(crm, str(tmp_path / "x"), fmt="xml")
    with pytest.raises(ConfigError, match="kind"):
        generate(spark, "loans", 10)
    with pytest.raises(ConfigError, match="--dirty-rate"):
        generate(spark, "fraud", 10, dirty_rate=0.7)


def _cli(log: Path, *args: str) -> subprocess.Popen:
    # A short-lived JVM spends most of its CPU in the optimizing JIT; C1 alone halves it for 2,000 rows.
    env = {**os.environ, "DOWNPOUR_SPARK_MASTER": "local[1]", "DOWNPOUR_DRIVER_MEMORY": "1g",
           "JDK_JAVA_OPTIONS": "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"}
    with log.open("w") as out:      # a file, not a pipe: a full pipe would stall the other JVM
        return subprocess.Popen([str(CLI), *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


@pytest.mark.skipif(not CLI.exists(), reason="the console script is installed by `make setup`")
def test_cli_is_deterministic_and_rejects_bad_rates(tmp_path):
    bad = subprocess.run([str(CLI), "generate", "fraud", "--rows", "10", "--out", str(tmp_path / "bad"),
                          "--dirty-rate", "2"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2, bad.stderr
    assert "--dirty-rate" in bad.stderr and "Traceback" not in bad.stderr + bad.stdout
    runs = [_cli(tmp_path / f"run{i}.log", "generate", "fraud", "--rows", "2000",
                 "--out", str(tmp_path / f"run{i}"), "--seed", "3") for i in (1, 2)]
    for i, p in enumerate(runs, 1):     # both JVMs run at once: half the wall time
        assert p.wait(timeout=600) == 0, (tmp_path / f"run{i}.log").read_text()[-2000:]
    texts = []
    for i in (1, 2):
        lines = [ln for f in sorted((tmp_path / f"run{i}").glob("part-*.csv")) for ln in f.read_text().splitlines()]
        texts.append(sorted(lines))
    assert texts[0] == texts[1] and len(texts[0]) == 2001   # 2000 rows + the header
    assert ",".join(FRAUD_SCHEMA) in texts[0]
