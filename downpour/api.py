"""The Python API: what the CLI does, callable from a notebook with an existing SparkSession.

>>> from downpour import api
>>> cfg = api.load("conf/crm_telco.yaml", ["training.epochs=3"])
>>> manifest = api.prepare(cfg, spark=spark)
>>> card = api.train(cfg, spark=spark)
>>> result = api.evaluate(cfg, spark=spark, gate=True)
>>> api.score(cfg, input_url="/data/new.csv", output_url="/data/scores", spark=spark)
"""

from __future__ import annotations

from typing import Any

from pyspark.sql import SparkSession

from downpour.config import Config, load_config
from downpour.logs import LOG, timed
from downpour.spark import get_spark


def load(conf: str, overrides: list[str] | None = None) -> Config:
    """Load and validate a config file (raises ConfigError naming the key path)."""
    return load_config(conf, overrides)


def generate(kind: str, rows: int, out: str, seed: int = 42, dirty_rate: float = 0.0, fmt: str = "csv",
             partitions: int | None = None, master: str | None = None,
             spark: SparkSession | None = None) -> str:
    """Write a synthetic raw dataset (``fraud`` or ``crm``) with a Spark job; returns the URL."""
    from downpour.pipelines import generate as gen

    spark = spark or get_spark(master=master)
    with timed(f"generate {kind} rows={rows:,} dirty_rate={dirty_rate}"):
        df = gen.generate(spark, kind, rows=rows, seed=seed, dirty_rate=dirty_rate)
        gen.write_raw(df, out, fmt=fmt, partitions=partitions, rows=rows)
    LOG.info("wrote %s", out)
    return out


def prepare(cfg: Config, spark: SparkSession | None = None, force: bool = False) -> dict[str, Any]:
    """Ingest, clean, quarantine, split, fit features on train, write shards; returns the manifest."""
    from downpour.pipelines.prepare import run_prepare

    return run_prepare(spark or get_spark(cfg), cfg, force=force)


def train(cfg: Config, spark: SparkSession | None = None, fresh: bool = False) -> dict[str, Any]:
    """Horovod-on-Spark training from the shards; exports the model; returns the model card."""
    from downpour.training.train import run_training

    return run_training(spark or get_spark(cfg), cfg, fresh=fresh)


def evaluate(cfg: Config, spark: SparkSession | None = None, gate: bool = False) -> dict[str, Any]:
    """Metrics on val/test, baseline, report; with ``gate`` promote or raise GateRefused.

    With ``tracking.mlflow_uri`` set, the evaluated model (promoted or refused) is logged to MLflow.
    """
    from downpour import tracking
    from downpour.errors import GateRefused
    from downpour.training.evaluate import run_evaluation

    tracking.check(cfg)
    try:
        result = run_evaluation(spark or get_spark(cfg), cfg, gate=gate)
    except GateRefused:
        tracking.log_evaluation(cfg)  # a refused model is worth seeing next to the champion
        raise
    tracking.log_evaluation(cfg)
    return result


def score(cfg: Config, input_url: str, output_url: str, model_dir: str | None = None,
          fmt: str | None = None, spark: SparkSession | None = None, history: list[str] | None = None,
          history_out: str | None = None, history_store: str | None = None,
          no_history: bool = False) -> dict[str, Any]:
    """Batch-score a raw table with the exported model; returns the summary (counts, history, gap).

    Window features are computed over the model's entity history plus ``history`` (raw rows or
    history datasets); ``history_out`` / ``history_store`` roll it forward for the next run."""
    from downpour.pipelines.score import run_scoring

    return run_scoring(spark or get_spark(cfg), cfg, input_url=input_url, output_url=output_url,
                       model_dir=model_dir, fmt=fmt, history=history, history_out=history_out,
                       history_store=history_store, no_history=no_history)


def run(cfg: Config, spark: SparkSession | None = None, force: bool = False,
        gate: bool = False) -> dict[str, Any]:
    """prepare -> train -> evaluate."""
    spark = spark or get_spark(cfg)
    manifest = prepare(cfg, spark=spark, force=force)
    card = train(cfg, spark=spark)
    result = evaluate(cfg, spark=spark, gate=gate)
    return {"manifest": manifest, "model_card": card, "evaluation": result}


def demo(out: str = "/tmp/downpour-demo", rows: int = 200_000) -> int:
    """Generate fraud data, run the whole pipeline on local Spark and print where the report is."""
    import os

    os.environ.setdefault("DOWNPOUR_PII_SALT", "demo-salt-not-secret")
    raw = f"{out}/raw/fraud"
    spark = get_spark()
    generate("fraud", rows=rows, out=raw, dirty_rate=0.01, spark=spark)
    cfg = load_config("conf/fraud.yaml", [f"input.path={raw}", f"output.path={out}/run"])
    result = run(cfg, spark=spark, force=True)
    report = result["evaluation"].get("report")
    print(f"\nDemo finished. Report: {report}")
    return 0
