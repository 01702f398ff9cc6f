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

# ---- a local mirror of Databricks Runtime 15.4 LTS ML (constraints-dbr15.4.txt: TF 2.16 + Keras 3 with
# tf_keras, pyarrow 14, pandas 1.5, numpy 1.23, PySpark 3.5.0, MLflow 2.13). Not part of `make test`.
# Keras 2 code runs there only with TF_USE_LEGACY_KERAS=1 (tf.keras -> tf_keras), as on the runtime.
DBR_VENV := .venv-dbr
DBR_PY := $(DBR_VENV)/bin/python
DBR_PIP := $(DBR_VENV)/bin/pip
DBR_PINS := constraints-dbr15.4.txt
DBR_STAMP := $(DBR_VENV)/.dbr-installed
DBR_CACHE := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/downpour/pip-dbr-$(shell echo '$(HOROVOD_ENV)' | cat - $(DBR_PINS) | cksum | cut -d" " -f1)
DBR_TESTS := tests/test_notebook.py tests/test_mlflow.py tests/test_keras_tracing.py \
	tests/test_train.py::test_two_workers_on_uneven_shards_survive_a_kill_resume_agree_learn_and_export
.PHONY: dbr-env test-dbr

dbr-env: check-tools $(DBR_STAMP)

# horovod: built from source against this environment's TensorFlow, through a pip cache of its own keyed
# by the pins and the build flags (the default cache holds the wheel `make setup` built against TF 2.15,
# which fails the import check: HorovodVersionMismatchError), so only the first run compiles; without its
# [spark] extra (it pins pyarrow<11; the runtime has 14). mlflow-skinny by its pin, not downpour[mlflow]
# (>=2.16; the runtime has 2.13.1).
$(DBR_STAMP): pyproject.toml $(DBR_PINS)
	@test -x $(DBR_PY) || $(PYTHON) -m venv $(DBR_VENV)
	$(DBR_PIP) install -q -U pip "setuptools<70" wheel
	$(DBR_PIP) install -q -c $(DBR_PINS) tensorflow tensorboard keras tf-keras numpy
	$(HOROVOD_ENV) $(DBR_PIP) install -q --no-build-isolation --cache-dir "$(DBR_CACHE)" -c $(DBR_PINS) horovod
	$(DBR_PIP) install -q -c $(DBR_PINS) pyspark pyarrow pandas petastorm mlflow-skinny -e ".[spark,dev]"
	TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=3 $(DBR_PY) -c "import horovod.tensorflow.keras, horovod.spark, petastorm, pyspark, mlflow, tf_keras"
	@touch $(DBR_STAMP)

test-dbr: dbr-env
	TF_USE_LEGACY_KERAS=1 $(DBR_PY) -m pytest $(DBR_TESTS) -q --durations=10
