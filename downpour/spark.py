"""The SparkSession: reuse the one a notebook or spark-submit gives us, else build a local one."""

from __future__ import annotations

import os
import sys

from pyspark import SparkConf, SparkContext
from pyspark.sql import SparkSession

from downpour.config import Config


def get_spark(cfg: Config | None = None, master: str | None = None) -> SparkSession:
    """Return the active session if there is one (Databricks, spark-submit), else create one.

    The master comes from, in order: ``master``, ``cfg.spark.master``, ``DOWNPOUR_SPARK_MASTER``,
    then ``local[*]``. Settings in ``cfg.spark.conf`` are applied either way where Spark allows.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    master = master or (cfg.spark.master if cfg else None) or os.environ.get("DOWNPOUR_SPARK_MASTER")
    # Under spark-submit the JVM launched us (PYSPARK_GATEWAY_PORT is set) and owns the master, the
    # app name and every --conf: connect to it first so SparkConf() sees them, and never override them.
    submitted: SparkConf | None = None
    if os.environ.get("PYSPARK_GATEWAY_PORT"):
        SparkContext._ensure_initialized()
        submitted = SparkConf()
    builder = SparkSession.builder
    if submitted is None or not submitted.contains("spark.app.name") or (
            cfg is not None and "app_name" in cfg.spark.model_fields_set):
        builder = builder.appName(cfg.spark.app_name if cfg else "downpour")
    if master or submitted is None:
        builder = builder.master(master or "local[*]")
    defaults = {
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": "8",
        "spark.sql.adaptive.enabled": "true",
        "spark.ui.showConsoleProgress": "true",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.driver.memory": os.environ.get("DOWNPOUR_DRIVER_MEMORY", "4g"),
    }
    effective = master or (submitted.get("spark.master", "") if submitted is not None else "") or "local[*]"
    if not effective.startswith("local"):
        # 8 shuffle partitions suit one machine; on a cluster keep Spark's default (200, coalesced by
        # AQE) so that large tables are not squeezed into a few huge partitions.
        defaults.pop("spark.sql.shuffle.partitions")
    if submitted is not None:
        defaults = {k: v for k, v in defaults.items() if not submitted.contains(k)}
    for k, v in {**defaults, **(cfg.spark.conf if cfg else {})}.items():
        builder = builder.config(k, str(v))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("DOWNPOUR_SPARK_LOG_LEVEL", "WARN"))
    return spark
