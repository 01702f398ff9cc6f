"""Shared fixtures: one SparkSession for the whole test session (local[2], small shuffles, UI off)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TELCO = SHARED_DATA / "telco_customer_churn.csv"

os.environ.setdefault("DOWNPOUR_PII_SALT", "test-salt")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("downpour-tests")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.default.parallelism", "4")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.driver.memory", "3g")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def plan_text():
    """The executed plan of a frame not yet run, with every field written out (``toString`` abbreviates
    long lists at ``spark.sql.debug.maxToStringFields``): for tests that count expressions in a plan."""
    def text(df) -> str:
        return str(df._jdf.queryExecution().executedPlan().treeString(True, False, 100_000, False))
    return text


@pytest.fixture
def telco_path() -> Path:
    if not TELCO.exists():
        pytest.skip(f"shared Telco table not found at {TELCO} (it lives in ../shared/data beside the checkout)")
    return TELCO


@pytest.fixture
def conf_dir() -> Path:
    return ROOT / "conf"
