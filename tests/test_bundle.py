"""The Databricks Asset Bundle (databricks.yml, resources/*.yml): valid for the Databricks CLI, and right
for Downpour. No Spark, no workspace, no network.

``scripts/check_bundle.py`` does the checking: the CLI's JSON schema (``databricks bundle schema`` of CLI
v1.13.0, in tests/data/databricks_bundle_schema/), the typed job models of ``databricks-bundles``, and the
rules no schema can see (files exist, the stages of jobs/ in the DAGs' order, secrets from a scope). The
tests below run it on the repository, spell the main promises out independently, and break copies of the
bundle on purpose to show that each kind of mistake is caught.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import re
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "tests" / "data" / "databricks_bundle_schema" / "jsonschema.json.gz"
SCHEMA_SHA256 = "e9d3a73f1e02461b0fb9e88b8c487134025b7d2abe45ef736260e842d90b522c"  # CLI v1.13.0's, unmodified
SCHEMA_CLI_VERSION = (1, 13, 0)
STAGES = ["prepare", "train", "evaluate", "score"]
JOBS_FILE = "resources/downpour.jobs.yml"


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("check_bundle", ROOT / "scripts" / "check_bundle.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_bundle"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundle(checker):
    loaded, problems = checker.load(ROOT)
    assert problems == []
    return loaded


def pipeline(bundle) -> dict:
    return bundle.config["resources"]["jobs"]["downpour_pipeline"]


def test_the_bundle_is_valid(checker):
    """Schema, typed models and Downpour's rules: no problem at all."""
    assert checker.check(ROOT) == []


def test_the_schema_is_the_clis_unmodified_and_the_models_are_not_older():
    with gzip.open(SCHEMA, "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == SCHEMA_SHA256
    installed = tuple(int(x) for x in re.findall(r"\d+", version("databricks-bundles"))[:3])
    assert installed >= SCHEMA_CLI_VERSION, "databricks-bundles older than the schema: pin the same release"


def test_the_pipeline_runs_the_stages_of_jobs_in_the_dags_order(checker, bundle):
    """prepare -> train -> evaluate -> score: jobs/<stage>.py each, a chain, as the DAGs run them."""
    job = pipeline(bundle)
    assert checker.dag_stages(ROOT) == STAGES == list(checker.dag_timeouts(ROOT))
    tasks = {t["task_key"]: t for t in job["tasks"]}
    assert checker.task_order(job) == STAGES
    for prev, stage in zip(STAGES, STAGES[1:], strict=False):
        assert tasks[stage]["depends_on"] == [{"task_key": prev}]
    for stage in STAGES:
        file = (ROOT / "resources" / tasks[stage]["spark_python_task"]["python_file"]).resolve()
        assert file == ROOT / "jobs" / f"{stage}.py" and file.is_file()
        args = tasks[stage]["spark_python_task"]["parameters"]
        assert args[:2] == ["--conf", "{{job.parameters.conf}}"]
        assert checker.cli_error(stage, args) is None  # the downpour CLI takes them as they are
    assert "--gate" in tasks["evaluate"]["spark_python_task"]["parameters"]
    assert tasks["evaluate"]["max_retries"] == 0  # a refusal is a decision, not retried
    assert tasks["score"].get("run_if", "ALL_SUCCESS") == "ALL_SUCCESS"  # never after a refusal


def test_every_file_the_jobs_run_exists_and_the_wheel_is_make_dists(bundle):
    jobs = bundle.config["resources"]["jobs"]
    walkthrough = jobs["downpour_walkthrough"]["tasks"][0]["notebook_task"]["notebook_path"]
    notebook = (ROOT / "resources" / walkthrough).resolve()
    assert notebook == ROOT / "notebooks" / "downpour_walkthrough.py"
    assert notebook.read_text().startswith("# Databricks notebook source")
    artifact = bundle.config["artifacts"]["downpour_wheel"]
    assert artifact["type"] == "whl" and artifact["build"] == "make dist"
    assert re.search(r"^dist:.*\n(?:\t.*\n)*\t\$\(PIP\) wheel .*-w dist", (ROOT / "Makefile").read_text(), re.M)
    for job in jobs.values():
        for task in job["tasks"]:
            assert {"whl": "../dist/*.whl"} in task["libraries"]


def test_the_job_cluster_is_15_4_lts_ml_with_a_gpu_variant(bundle):
    variables = bundle.config["variables"]
    assert variables["spark_version"]["default"] == "15.4.x-cpu-ml-scala2.12"
    assert bundle.config["targets"]["dev-gpu"]["variables"]["spark_version"] == "15.4.x-gpu-ml-scala2.12"
    for job in bundle.config["resources"]["jobs"].values():
        assert job["job_clusters"][0]["new_cluster"]["spark_version"] == "${var.spark_version}"
    assert bundle.config["targets"]["dev"]["mode"] == "development"
    assert bundle.config["targets"]["prod"]["mode"] == "production"


def test_the_salt_comes_from_the_notebooks_secret_scope_and_no_literal_salt_is_shipped(bundle):
    """Every job cluster gets DOWNPOUR_PII_SALT from {{secrets/<scope>/pii_salt}}, the scope and key the
    notebook reads; none of the repository's demo / test salts appears in a bundle file."""
    notebook = (ROOT / "notebooks" / "downpour_walkthrough.py").read_text()
    scope_default = re.search(r'widgets\.text\("secret_scope", "([^"]+)"', notebook).group(1)
    key = re.search(r'dbutils\.secrets\.get\(.*key="([^"]+)"\)', notebook).group(1)
    assert bundle.config["variables"]["secret_scope"]["default"] == scope_default
    for job in bundle.config["resources"]["jobs"].values():
        for cluster in job["job_clusters"]:
            env = cluster["new_cluster"]["spark_env_vars"]
            assert env["DOWNPOUR_PII_SALT"] == f"{{{{secrets/${{var.secret_scope}}/{key}}}}}"
    literal_salts = {"demo-salt-not-secret", "test-salt"}  # Makefile / downpour.api, tests/conftest.py
    for path in bundle.files:
        text = path.read_text()
        assert not [s for s in literal_salts if s in text], path


# ---- companions: the checker catches what is broken on purpose ----------------------------------------------
def broken_copy(tmp_path: Path, edits: list[tuple[str, str, str]]) -> Path:
    """A copy of what the bundle refers to, with ``(file, old, new)`` edits (old must be there)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in ("databricks.yml", "pyproject.toml", "Makefile"):
        shutil.copy(ROOT / name, tmp_path / name)
    for name in ("resources", "jobs", "dags", "notebooks"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for package in ("downpour", "pipelines", "features", "training"):  # that they are not synced is checked
        (tmp_path / package).mkdir()
        shutil.copy(ROOT / package / "__init__.py", tmp_path / package / "__init__.py")
    for file, old, new in edits:
        path = tmp_path / file
        text = path.read_text()
        assert old in text, f"{file}: {old!r} not found: update the test"
        path.write_text(text.replace(old, new, 1))
    return tmp_path


PREPARE = "          job_cluster_key: downpour\n          timeout_seconds: 7200  #"
SALT_REF = '"{{secrets/${var.secret_scope}/pii_salt}}"'

BREAKS = {
    # the CLI's schema (and, for jobs, the typed models)
    "unknown task field": ([(JOBS_FILE, PREPARE, PREPARE.replace("timeout", "retries: 3\n          timeout"))],
                           ["('retries' was unexpected)", "Unexpected field 'retries' for class Task"]),
    "unknown cluster field": ([(JOBS_FILE, "num_workers: ${var.num_workers}", "workers: 2")],
                              ["('workers' was unexpected)", "Unexpected field 'workers' for class ClusterSpec"]),
    "bad enum": ([(JOBS_FILE, "run_if: ALL_SUCCESS", "run_if: ALL_SUCCEEDED")],
                 ["'ALL_SUCCEEDED' is not one of", "'ALL_SUCCEEDED' is not a valid RunIf"]),
    "wrong type": ([(JOBS_FILE, "timeout_seconds: 7200  #", "timeout_seconds: 2h  #")],
                   ["timeout_seconds: '2h' is not of type 'integer'"]),
    "unknown target field": ([("databricks.yml", "    mode: production\n", "    mode: production\n    host: x\n")],
                             ["targets.prod: Additional properties are not allowed ('host' was unexpected)"]),
    "unknown top-level key": ([("databricks.yml", "\nsync:\n", "\nsyncs:\n")], ["unknown top-level key 'syncs'"]),
    # the job's graph
    "dependency on a missing task": (
        [(JOBS_FILE, "            - task_key: train\n", "            - task_key: training\n")],
        ["task 'evaluate' depends on 'training', which is not a task of the job"]),
    "cycle": ([(JOBS_FILE, "        - task_key: prepare\n", "        - task_key: prepare\n          depends_on:\n"
                                                              "            - task_key: score\n")],
              ["form a cycle"]),
    "missing job cluster": ([(JOBS_FILE, "job_cluster_key: downpour\n          timeout_seconds: 14400",
                              "job_cluster_key: gpu\n          timeout_seconds: 14400")],
                            ["runs on job cluster 'gpu', which the job does not define"]),
    # files and entry points
    "missing python file": ([(JOBS_FILE, "../jobs/train.py", "../jobs/fit.py")],
                            ["python_file jobs/fit.py does not exist"]),
    "python file not synced": ([("databricks.yml", "    - dags/**\n", "    - dags/**\n    - jobs/**\n")],
                               ["python_file jobs/prepare.py is excluded by sync"]),
    "package source synced": ([("databricks.yml", "    - pipelines/**\n", "")],
                              ["sync: pipelines/ is synced: the tasks must import the wheel"]),
    "missing notebook": ([(JOBS_FILE, "../notebooks/downpour_walkthrough.py", "../notebooks/walkthrough.py")],
                         ["notebook notebooks/walkthrough.py does not exist"]),
    "unknown widget": ([(JOBS_FILE, "use_case: crm_telco", "usecase: crm_telco")],
                       ["base parameter 'usecase' is not a widget"]),
    "wheel task with a wrong entry point": (
        [(JOBS_FILE, "spark_python_task:\n            python_file: ../jobs/prepare.py",
          "python_wheel_task:\n            package_name: downpour\n            entry_point: prepare\n"
          "          spark_python_task:\n            python_file: ../jobs/prepare.py")],
        ["entry_point 'prepare' is not one of the wheel's [project.scripts] ['downpour']"]),
    "library that is not the wheel": ([(JOBS_FILE, "- whl: ../dist/*.whl", "- whl: ../build/*.whl")],
                                      ["library ../build/*.whl does not match the wheel make dist builds"]),
    # the stages
    "stages out of order": ([(JOBS_FILE, "../jobs/evaluate.py", "../jobs/SCORE.py"),
                             (JOBS_FILE, "../jobs/score.py", "../jobs/evaluate.py"),
                             (JOBS_FILE, "../jobs/SCORE.py", "../jobs/score.py")],
                            ["stages ['prepare', 'train', 'score', 'evaluate'] (in depends_on order) are not jobs/"]),
    "a stage the CLI rejects": ([(JOBS_FILE, "              - --input\n", "              - --source\n")],
                                ["`downpour score", "the following arguments are required: --input"]),
    "evaluate without the gate": ([(JOBS_FILE, "              - --gate\n", "")], ["evaluate must run the gate"]),
    "evaluate retried": ([(JOBS_FILE, "max_retries: 0", "max_retries: 2")], ["max_retries must be 0"]),
    "timeout not the DAGs'": ([(JOBS_FILE, "timeout_seconds: 28800\n          max_retries: 2",
                                "timeout_seconds: 3600\n          max_retries: 2")],
                              ["task 'train': timeout_seconds 3600 is not the DAGs' 28800"]),
    # targets and variables
    "mode typo": ([("databricks.yml", "mode: development\n    default: true", "mode: develop\n    default: true")],
                  ["targets.dev.mode: 'develop' is neither 'development' nor 'production'"]),
    "prod without root_path": ([("databricks.yml", "      root_path: /Workspace/", "      #root_path: /Workspace/")],
                               ["mode production needs workspace.root_path"]),
    "undeclared variable": ([(JOBS_FILE, "${var.num_workers}", "${var.workers}")],
                            ["${var.workers} is not declared"]),
    "undeclared job parameter": ([(JOBS_FILE, "{{job.parameters.score_input}}", "{{job.parameters.scoring_input}}")],
                                 ["{{job.parameters.scoring_input}} is not a job parameter"]),
    # secrets
    "literal salt": ([(JOBS_FILE, SALT_REF, "s3cr3t-pepper")],
                     ["spark_env_vars.DOWNPOUR_PII_SALT: 's3cr3t-pepper' is a literal",
                      "spark_env_vars.DOWNPOUR_PII_SALT must be a secret reference"]),
    "salt in spark conf": ([(JOBS_FILE, "spark.redaction.regex:",
                             "spark.executorEnv.DOWNPOUR_PII_SALT: s3cr3t\n              spark.redaction.regex:")],
                           ["spark_conf.spark.executorEnv.DOWNPOUR_PII_SALT: 's3cr3t' is a literal"]),
    "salt in a --set": (
        [(JOBS_FILE, '              - "output.path={{job.parameters.output_path}}"\n          libraries: &',
          '              - "output.path={{job.parameters.output_path}}"\n              - --set\n'
          '              - "spark.conf.spark.executorEnv.DOWNPOUR_PII_SALT=s3cr3t"\n          libraries: &')],
        ["spark.conf.spark.executorEnv.DOWNPOUR_PII_SALT is given a literal value"]),
    "salt as a job parameter": (
        [(JOBS_FILE, "        - name: conf\n",
          "        - name: pii_salt\n          default: x\n        - name: conf\n")],
        ["job parameter 'pii_salt': parameters are shown with every run"]),
    "salt in a variable": ([("databricks.yml", "variables:\n  secret_scope:",
                             "variables:\n  pii_salt:\n    default: s3cr3t\n  secret_scope:")],
                           ["variables.pii_salt.default: 's3cr3t' is a literal"]),
    "secret scope left empty": ([("databricks.yml", "    variables:\n      output_root: dbfs:/ml/downpour",
                                  "    variables:\n      output_root: dbfs:/ml/downpour\n      secret_scope: ''")],
                                ["targets.prod: variable 'secret_scope' has no value",
                                 "resolves to '{{secrets//pii_salt}}', not a secret reference"]),
}


def test_an_unedited_copy_is_valid(checker, tmp_path):
    """So that every problem below comes from its edit, not from the copy."""
    assert checker.check(broken_copy(tmp_path, [])) == []


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_a_broken_bundle_is_caught(checker, tmp_path, case):
    edits, expected = BREAKS[case]
    problems = checker.check(broken_copy(tmp_path, edits))
    for fragment in expected:
        assert any(fragment in p for p in problems), f"{case}: {fragment!r} not in {problems}"


def test_the_schema_alone_catches_what_only_it_knows(checker, tmp_path):
    """Outside jobs (targets, artifacts) only the CLI's schema knows the fields: the typed models are not
    asked, and the schema still fails the bundle."""
    root = broken_copy(tmp_path, [("databricks.yml", "    type: whl\n", "    type: whl\n    builder: make\n")])
    bundle, _ = checker.load(root)
    assert checker.typed_problems(bundle) == []
    assert checker.schema_problems(bundle) == [
        "databricks.yml: artifacts.downpour_wheel: Additional properties are not allowed ('builder' was unexpected)"]


def test_the_yaml_anchors_expand_to_the_same_cluster_and_libraries(bundle):
    """The notebook job reuses the pipeline's cluster and libraries (YAML anchors in one file)."""
    jobs = bundle.config["resources"]["jobs"]
    assert jobs["downpour_walkthrough"]["job_clusters"] == jobs["downpour_pipeline"]["job_clusters"]
    libs = [t["libraries"] for job in jobs.values() for t in job["tasks"]]
    assert all(lib == libs[0] for lib in libs)
    assert yaml.safe_load((ROOT / JOBS_FILE).read_text())["resources"]["jobs"].keys() == jobs.keys()
