# Downpour: two commands for users (make demo, make test); the rest is for developers.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.downpour-installed
HOROVOD_ENV := HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
	HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
DEMO_OUT ?= /tmp/downpour-demo

.PHONY: setup demo test test-fast lint bench bench-quick dist clean check-tools

setup: check-tools $(STAMP)

check-tools:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "setup: Python 3.11 is required: install python3.11 (e.g. pyenv install 3.11) or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || { echo "setup: $(PYTHON) is not Python 3.11: install Python 3.11 (TensorFlow 2.15 and Horovod 0.28 are pinned to it)"; exit 1; }
	@command -v java >/dev/null 2>&1 || { echo "setup: Java 17+ is required by Spark: install a JDK 17 (e.g. apt-get install openjdk-17-jdk-headless)"; exit 1; }
	@v=$$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1); [ "$${v:-0}" -ge 17 ] || { echo "setup: Java $$v found, Spark 3.5 here needs Java 17+: install a JDK 17"; exit 1; }

# The stamp depends on the files that define the environment: a second run rebuilds nothing.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip "setuptools<70" wheel
	$(PIP) install -q -c constraints.txt tensorflow-cpu==2.15.1
	$(HOROVOD_ENV) $(PIP) install -q --no-build-isolation -c constraints.txt "horovod[spark]==0.28.1"
	$(PIP) install -q -c constraints.txt -e ".[spark,dev,mlflow]"
	$(PY) -c "import horovod.tensorflow.keras, horovod.spark, petastorm, pyspark, tensorflow" 2>/dev/null
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/downpour demo --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest tests -q --durations=25

test-fast: setup
	$(PY) -m pytest tests -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m benchmarks.run

bench-quick: setup
	$(PY) -m benchmarks.run --quick

clean:
	rm -rf build dist *.egg-info .pytest_cache

# ---- where users run it: spark-submit, a local standalone cluster, Airflow (README "Running on a cluster")
AIRFLOW_VENV := .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.airflow-installed
AIRFLOW_PINS := "apache-airflow==3.1.8" "apache-airflow-providers-apache-spark==6.3.4"
.PHONY: cluster-demo airflow-venv

# dist/: the wheel (pip wheel --no-deps), downpour-pyfiles.zip for --py-files, jobs/, conf/, SHIPPING.txt
dist: setup
	rm -rf build dist
	$(PIP) wheel -q --no-deps --no-build-isolation -w dist .
	rm -rf build
	$(PY) scripts/build_dist.py dist

# A Spark standalone master and two 1-core workers on 127.0.0.1, the Telco pipeline on them, then stop.
cluster-demo: setup
	DOWNPOUR_PII_SALT=$${DOWNPOUR_PII_SALT:-demo-salt-not-secret} \
	$(PY) scripts/standalone_cluster.py demo --conf conf/crm_telco.yaml \
		--set output.path=$(DEMO_OUT)/cluster --set training.epochs=2

# Apache Airflow 3 in its own venv (its dependencies never touch .venv); the stamp makes it idempotent.
airflow-venv: check-tools $(AIRFLOW_STAMP)

$(AIRFLOW_STAMP): scripts/airflow-constraints.txt
	@test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install -q -U pip
	$(AIRFLOW_VENV)/bin/pip install -q -c scripts/airflow-constraints.txt $(AIRFLOW_PINS)
	$(AIRFLOW_VENV)/bin/python -c "import airflow.sdk, airflow.providers.apache.spark.operators.spark_submit"
	@touch $(AIRFLOW_STAMP)
