# Databricks notebook source
# MAGIC %md
# MAGIC # Downpour walkthrough: from a raw table to a promoted model, in the cluster you already have
# MAGIC
# MAGIC This notebook runs the whole Downpour pipeline through its Python API (`downpour.api`) on the
# MAGIC `spark` session of the notebook:
# MAGIC
# MAGIC 1. **prepare**: ingest, clean (bad rows go to quarantine with a reason), leakage-free split,
# MAGIC    features fitted on the train split only, Parquet shards and a manifest;
# MAGIC 2. **train**: Horovod on the Spark executors, reading the shards with petastorm into `tf.data`;
# MAGIC 3. **evaluate**: metrics on val/test in Spark, a baseline, a report, and the quality gate that
# MAGIC    promotes the model only if it is not worse than the current champion;
# MAGIC 4. **score**: batch scoring of a raw table with the exported model.
# MAGIC
# MAGIC **Set up** (once per cluster): install the wheel built by `make dist` on the cluster (Libraries
# MAGIC tab, or `%pip install /dbfs/FileStore/downpour/downpour-0.1.0-py3-none-any.whl`) on a runtime with
# MAGIC Python 3.11 (DBR 15.x LTS ML), and put the PII salt in a secret scope
# MAGIC (`databricks secrets put-secret downpour pii_salt`). Use a cluster with at least as many executor
# MAGIC cores (or GPUs) as `training.workers`.
# MAGIC
# MAGIC The widgets above choose the use case and the paths; leave a path empty to use the config's.

# COMMAND ----------

dbutils.widgets.dropdown("use_case", "crm_telco", ["crm_telco", "fraud"], "Use case")
dbutils.widgets.text("conf", "", "Config file (empty: conf/<use case>.yaml)")
dbutils.widgets.text("input_path", "", "Raw table URL (empty: the config's; fraud: generated)")
dbutils.widgets.text("output_path", "dbfs:/tmp/downpour", "Output URL")
dbutils.widgets.text("epochs", "3", "Training epochs")
dbutils.widgets.text("workers", "2", "Horovod workers (executor slots)")
dbutils.widgets.text("secret_scope", "downpour", "Secret scope holding pii_salt")
dbutils.widgets.text("mlflow_uri", "", "MLflow tracking URI (e.g. databricks; empty: no tracking)")

# COMMAND ----------

import importlib.util
import json
import os
from pathlib import Path

# Runtime 15.4 LTS ML ships TensorFlow 2.16, whose tf.keras is Keras 3 unless this is set before TensorFlow
# is first imported; Downpour (and Horovod 0.28.1) need Keras 2, there the tf_keras package. Set it on the
# cluster too (its environment variables; databricks.yml does), so that executors get it.
if importlib.util.find_spec("tf_keras") is not None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from downpour import api
from downpour.errors import GateRefused

use_case = dbutils.widgets.get("use_case")
output_root = dbutils.widgets.get("output_path").rstrip("/")
input_path = dbutils.widgets.get("input_path").strip()

# The salt that hashes PII ids comes from the environment; on Databricks, from a secret scope.
if not os.environ.get("DOWNPOUR_PII_SALT"):
    os.environ["DOWNPOUR_PII_SALT"] = dbutils.secrets.get(scope=dbutils.widgets.get("secret_scope"), key="pii_salt")


def find_conf(name: str) -> str:
    """The config file: the widget's, else conf/<name>.yaml in the repo (this notebook's parent's)."""
    given = dbutils.widgets.get("conf").strip()
    if given:
        return given
    for base in (Path.cwd(), Path.cwd().parent):
        candidate = base / "conf" / f"{name}.yaml"
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"conf/{name}.yaml not found from {Path.cwd()}; set the 'conf' widget")


# COMMAND ----------

# MAGIC %md
# MAGIC ## The configuration
# MAGIC One validated object: a wrong key or type fails here, naming the key path, before any Spark work.
# MAGIC The widgets become `--set`-style overrides, exactly what `downpour prepare --set ...` would do.

# COMMAND ----------

output_path = f"{output_root}/{use_case}"
if use_case == "fraud" and not input_path:
    # No fraud table at hand: generate a small synthetic one with a Spark job (1% dirty rows).
    input_path = api.generate("fraud", rows=50_000, out=f"{output_root}/raw/fraud", dirty_rate=0.01, spark=spark)

overrides = [
    f"output.path={output_path}",
    f"training.epochs={int(dbutils.widgets.get('epochs'))}",
    f"training.workers={int(dbutils.widgets.get('workers'))}",
]
if input_path:
    overrides.append(f"input.path={input_path}")
if dbutils.widgets.get("mlflow_uri").strip():
    overrides.append(f"tracking.mlflow_uri={dbutils.widgets.get('mlflow_uri').strip()}")
cfg = api.load(find_conf(use_case), overrides)
print(f"{cfg.name}: {cfg.input.format} from {cfg.input.path} -> {cfg.output.path}")
print(f"label {cfg.label.column} (positive {cfg.label.positive!r}); PII dropped {cfg.pii.drop}, hashed {cfg.pii.hash}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## 1. Prepare
# MAGIC Every input row is accounted for: `input == clean + quarantined + duplicates`.

# COMMAND ----------

manifest = api.prepare(cfg, spark=spark, force=True)
counts = manifest["counts"]
assert counts["input"] == counts["clean"] + counts["quarantined"] + counts["duplicates"], counts
display(spark.createDataFrame(
    [(split, int(info.get("rows", 0)), int(info.get("positives", 0)), int(info.get("files", 0)))
     for split, info in manifest["splits"].items()],
    "split string, rows long, positives long, files long",
))
print(json.dumps({"counts": counts, "quarantine_reasons": manifest.get("quarantine_reasons")}, indent=2))

# COMMAND ----------

# The shards hold model-ready columns only (n__* numerics, c__* category indices, label, row_id).
# The manifest names the exact data version's files: later runs cannot change what this reads.
train_shards = spark.read.parquet(manifest["splits"]["train"]["path"])
display(train_shards.limit(5))

# COMMAND ----------

# MAGIC %md
# MAGIC ## 2. Train
# MAGIC Horovod runs one worker per Spark task (`training.workers` of them), each reading its share of the
# MAGIC shards. The model card records what ran where.

# COMMAND ----------

card = api.train(cfg, spark=spark)
print(f"model {card['model_version']}: {card['training']['epochs_completed']} epochs on "
      f"{card['training']['workers']} workers; placement {card['training']['placement']}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## 3. Evaluate, with the quality gate
# MAGIC The gate promotes the model to the registry's champion unless it is worse than the champion on the
# MAGIC same test split; a refusal is a normal outcome (`GateRefused`), shown here rather than raised.

# COMMAND ----------

try:
    evaluation = api.evaluate(cfg, spark=spark, gate=True)
    gate = evaluation.get("gate") or {}
except GateRefused as refusal:
    evaluation, gate = None, {"promoted": False, "reason": str(refusal)}
print("gate:", gate.get("reason"))
if evaluation is not None:
    display(spark.createDataFrame(
        [(split, float(m.get("roc_auc") or 0.0), float(m.get("pr_auc") or 0.0))
         for split, m in evaluation["metrics"].items()],
        "split string, roc_auc double, pr_auc double",
    ))
    print("report:", evaluation.get("report"))

# COMMAND ----------

# MAGIC %md
# MAGIC ## 4. Score a raw table
# MAGIC The exported model takes the raw columns: the same cleaning and feature transformation run inside
# MAGIC it, so what is scored here is what a serving endpoint would score.

# COMMAND ----------

scores_url = f"{cfg.output.path}/scores"
scored = api.score(cfg, input_url=cfg.input.path, output_url=scores_url, spark=spark)
scores = spark.read.parquet(scores_url)
display(scores.orderBy(scores["score"].desc()).limit(10))
print(scored)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Next
# MAGIC * Schedule it: a Databricks job per stage with the `jobs/*.py` scripts (spark_python_task), or the
# MAGIC   Airflow DAG in `dags/downpour_retrain.py`.
# MAGIC * Track it: the `mlflow_uri` widget (or `tracking.mlflow_uri: databricks` in the config) logs the
# MAGIC   params, metrics, report and model of every evaluated model to MLflow.
