"""Check the Databricks Asset Bundle (databricks.yml and the resources/*.yml it includes), offline.

    python scripts/check_bundle.py [REPO]      # exit 0: valid; 1: one line per problem on stderr

No workspace, no network: what ``databricks bundle validate`` checks against the schema (it needs a
workspace to run at all), and what the CLI cannot know about Downpour:

1. **Schema.** Every bundle file against the JSON schema that the Databricks CLI publishes
   (``databricks bundle schema``; a copy of CLI v1.13.0's in ``tests/data/databricks_bundle_schema/``,
   whose README gives its source, licence and checksum). Its ``pattern`` keywords use ``\\p{L}`` (Go
   regexp), which Python's ``re`` lacks: they are matched with the ``regex`` package. The schema lets any
   top-level key through (for YAML anchors); this bundle has none, so an unknown top-level key is an error.
2. **Typed models.** Every job through ``databricks.bundles.jobs.Job.from_dict`` (PyPI
   ``databricks-bundles``, the same release as the schema): unknown fields, enum values, required fields.
3. **Downpour's rules**, which no schema can see:
   - targets ``dev`` (``mode: development``, the default) and ``prod`` (``mode: production``, with the
     explicit ``workspace.root_path`` the CLI demands); modes are ``development`` or ``production``;
   - every ``${var.X}`` is declared and has a value in every target; every ``{{job.parameters.X}}``
     is a parameter of its job;
   - tasks: unique keys, ``depends_on`` and ``job_cluster_key`` name existing ones, no cycle;
   - every ``spark_python_task`` file and notebook exists in the repository and is synced, the package's
     sources are not (the tasks import the wheel); a ``python_wheel_task`` names this wheel and one of
     its entry points; ``whl`` libraries match the wheel that the artifact (``make dist``) builds;
   - the pipeline job runs the stages of ``jobs/`` in the order of the Airflow DAGs (the retraining DAG's
     Spark stages, then the scoring DAG's), each ``jobs/<stage>.py`` with arguments the ``downpour`` CLI
     accepts, ``evaluate`` with ``--gate``, ``score`` only after it succeeded, and the DAGs' timeouts;
   - the notebook job sets only widgets that the notebook declares;
   - the PII salt (``pii.salt_env``, ``DOWNPOUR_PII_SALT``) reaches every job cluster from a secret
     scope (``{{secrets/<scope>/<key>}}``) and nowhere as a literal; no credential-like setting
     (``downpour.config.SECRET_KEY``: spark_conf, spark_env_vars, notebook parameters, variables,
     ``--set spark.conf.*`` items) holds a literal value, and no job parameter is named like one.

``tests/test_bundle.py`` runs it on the repository, and on broken copies to show each rule fires.
"""

from __future__ import annotations

import argparse
import ast
import copy
import fnmatch
import glob
import gzip
import json
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "tests" / "data" / "databricks_bundle_schema" / "jsonschema.json.gz"
MODES = {"development", "production"}
REQUIRED_TARGETS = {"dev": "development", "prod": "production"}
PIPELINE_JOB = "downpour_pipeline"
NOTEBOOK_HEADER = "# Databricks notebook source"
VAR_REF = re.compile(r"\$\{var\.([A-Za-z0-9_-]+)\}")
PARAM_REF = re.compile(r"\{\{\s*job\.parameters\.([A-Za-z0-9_.-]+)\s*\}\}")
# a secret reference as Databricks resolves it in spark_conf / spark_env_vars; the scope may be a variable
SECRET_REF = re.compile(r"\{\{secrets/(?:[A-Za-z0-9_.-]+|\$\{var\.[A-Za-z0-9_-]+\})/[A-Za-z0-9_.-]+\}\}")
# names that only name a secret (a scope, an environment variable's name), never hold one
NAMES_A_SECRET = re.compile(r"(scope|salt_env)$", re.IGNORECASE)


@dataclass
class Bundle:
    """The bundle as the files say it: each file's parsed YAML, and the merged top level."""

    root: Path
    files: dict[Path, dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    job_files: dict[str, Path] = field(default_factory=dict)  # job name -> the file that defines it


def load(root: Path = ROOT) -> tuple[Bundle, list[str]]:
    """databricks.yml and the files its ``include`` globs name (the CLI's relative-to-root rule)."""
    problems: list[str] = []
    main = root / "databricks.yml"
    if not main.is_file():
        return Bundle(root, {}), [f"{main}: no databricks.yml"]
    files = {main: yaml.safe_load(main.read_text()) or {}}
    for pattern in files[main].get("include") or []:
        matched = sorted(Path(p) for p in glob.glob(str(root / pattern)))
        if not matched:
            problems.append(f"databricks.yml: include {pattern!r} matches no file")
        for path in matched:
            files[path] = yaml.safe_load(path.read_text()) or {}
    bundle = Bundle(root, files)
    merged: dict[str, Any] = {}
    for path, doc in files.items():
        if not isinstance(doc, dict):
            problems.append(f"{rel(bundle, path)}: not a mapping")
            continue
        for key, value in doc.items():
            if key == "resources" and isinstance(value, dict):
                for kind, items in value.items():
                    for name, item in (items or {}).items():
                        if name in merged.setdefault("resources", {}).setdefault(kind, {}):
                            problems.append(f"{rel(bundle, path)}: resources.{kind}.{name} is defined twice")
                        merged["resources"][kind][name] = item
                        if kind == "jobs":
                            bundle.job_files[name] = path
            elif key in merged and path != main:
                problems.append(f"{rel(bundle, path)}: top-level {key!r} is already set in databricks.yml")
            else:
                merged[key] = value
    bundle.config = merged
    return bundle, problems


def rel(bundle: Bundle, path: Path) -> str:
    try:
        return str(path.resolve().relative_to(bundle.root.resolve()))
    except ValueError:
        return str(path)


# ---- 1. the CLI's JSON schema ----------------------------------------------------------------------------
@lru_cache(maxsize=2)
def schema_validator(path: Path = SCHEMA) -> Any:
    import jsonschema
    import regex

    with gzip.open(path, "rt", encoding="utf-8") as fh:
        schema = json.load(fh)

    def pattern(validator: Any, patrn: str, instance: Any, _schema: Any) -> Iterator[Any]:
        if validator.is_type(instance, "string") and not regex.search(patrn, instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {patrn!r}")

    # the schema names no draft; it uses $defs (2019-09 on), so the latest draft reads it as the CLI means it
    base = jsonschema.Draft202012Validator
    checker = jsonschema.FormatChecker()
    checker.checks("regex", raises=regex.error)(regex.compile)  # the metaschema's "format: regex", Go-style
    base(base.META_SCHEMA, format_checker=checker).validate(schema)  # the schema itself is well-formed
    return jsonschema.validators.extend(base, {"pattern": pattern})(schema)


def schema_problems(bundle: Bundle, schema: Path = SCHEMA) -> list[str]:
    validator = schema_validator(schema)
    known = set(validator.schema["properties"])
    problems = []
    for path, doc in bundle.files.items():
        for key in sorted(set(doc) - known if isinstance(doc, dict) else ()):
            problems.append(f"{rel(bundle, path)}: unknown top-level key {key!r} (schema: {sorted(known)})")
        found = {(dotted(tuple(e.absolute_path)), e.message)
                 for top in validator.iter_errors(doc) for e in _leaves(top)}
        problems += [f"{rel(bundle, path)}: {where or '<root>'}: {message}" for where, message in sorted(found)]
    return problems


def _leaves(err: Any) -> list[Any]:
    """The errors that say what is wrong. The schema makes every object and number ``oneOf`` (the value,
    or a ``${...}`` reference string): follow the value's branch down to the failing keywords."""
    if not err.context:
        return [err]
    branches = [e for e in err.context if e.validator not in ("type", "pattern")]
    if not branches:  # a wrong scalar: "is not of type 'integer'" says it best
        return [err.context[0]]
    return [leaf for e in branches for leaf in _leaves(e)]


# ---- 2. the typed models of databricks-bundles --------------------------------------------------------------
def typed_problems(bundle: Bundle) -> list[str]:
    from databricks.bundles.jobs import Job

    problems = []
    for name, job in (bundle.config.get("resources", {}).get("jobs") or {}).items():
        try:
            Job.from_dict(copy.deepcopy(job))
        except (ValueError, TypeError) as exc:
            problems.append(f"{rel(bundle, bundle.job_files[name])}: resources.jobs.{name}: {exc}")
    return problems


# ---- 3. Downpour's rules ------------------------------------------------------------------------------------
def walk(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path, value) of every leaf."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from walk(value, (*path, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from walk(value, (*path, i))
    else:
        yield path, obj


def dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def target_problems(bundle: Bundle) -> list[str]:
    targets = bundle.config.get("targets") or {}
    problems = []
    for name, mode in REQUIRED_TARGETS.items():
        if (targets.get(name) or {}).get("mode") != mode:
            problems.append(f"targets.{name}: missing or not 'mode: {mode}'")
    for name, target in targets.items():
        target = target or {}
        if target.get("mode") is not None and target["mode"] not in MODES:
            problems.append(f"targets.{name}.mode: {target['mode']!r} is neither 'development' nor 'production'")
        if target.get("mode") == "production" and not (target.get("workspace") or {}).get("root_path"):
            problems.append(f"targets.{name}: mode production needs workspace.root_path (one copy per workspace)")
    defaults = [n for n, t in targets.items() if (t or {}).get("default") is True]
    if defaults != ["dev"]:
        problems.append(f"targets: the default target must be dev alone, not {defaults}")
    return problems


def variable_values(bundle: Bundle, target: str) -> dict[str, Any]:
    declared = bundle.config.get("variables") or {}
    values = {k: (v or {}).get("default") for k, v in declared.items()}
    for k, v in ((bundle.config.get("targets") or {}).get(target) or {}).get("variables", {}).items():
        values[k] = v.get("default") if isinstance(v, dict) else v
    return values


def variable_problems(bundle: Bundle) -> list[str]:
    declared = bundle.config.get("variables") or {}
    problems = []
    for path, doc in bundle.files.items():
        for where, value in walk(doc):
            for name in VAR_REF.findall(value) if isinstance(value, str) else []:
                if name not in declared:
                    problems.append(f"{rel(bundle, path)}: {dotted(where)}: ${{var.{name}}} is not declared")
    for target, spec in (bundle.config.get("targets") or {}).items():
        for name in ((spec or {}).get("variables") or {}):
            if name not in declared:
                problems.append(f"targets.{target}.variables.{name}: not declared in variables")
        for name, value in variable_values(bundle, target).items():
            if value is None or value == "":
                problems.append(f"targets.{target}: variable {name!r} has no value (no default, not set)")
    return problems


def job_problems(bundle: Bundle) -> list[str]:
    problems = []
    for name, job in (bundle.config.get("resources", {}).get("jobs") or {}).items():
        where = f"{rel(bundle, bundle.job_files[name])}: resources.jobs.{name}"
        params = {p.get("name") for p in job.get("parameters") or []}
        for path, value in walk(job):
            for ref in PARAM_REF.findall(value) if isinstance(value, str) else []:
                if ref not in params:
                    problems.append(f"{where}.{dotted(path)}: {{{{job.parameters.{ref}}}}} is not a job parameter")
        tasks = job.get("tasks") or []
        keys = [t.get("task_key") for t in tasks]
        for key in {k for k in keys if keys.count(k) > 1}:
            problems.append(f"{where}: task_key {key!r} is used twice")
        clusters = {c.get("job_cluster_key") for c in job.get("job_clusters") or []}
        for task in tasks:
            for dep in task.get("depends_on") or []:
                if dep.get("task_key") not in keys:
                    problems.append(f"{where}: task {task.get('task_key')!r} depends on {dep.get('task_key')!r}, "
                                    "which is not a task of the job")
            if task.get("job_cluster_key") is not None and task["job_cluster_key"] not in clusters:
                problems.append(f"{where}: task {task.get('task_key')!r} runs on job cluster "
                                f"{task['job_cluster_key']!r}, which the job does not define")
        if not problems and _cycle(tasks):
            problems.append(f"{where}: the tasks' depends_on form a cycle")
    return problems


def _cycle(tasks: list[dict[str, Any]]) -> bool:
    deps = {t.get("task_key"): [d.get("task_key") for d in t.get("depends_on") or []] for t in tasks}
    done: set[str] = set()
    while len(done) < len(deps):
        ready = [k for k, ds in deps.items() if k not in done and all(d in done for d in ds)]
        if not ready:
            return True
        done.update(ready)
    return False


def task_order(job: dict[str, Any]) -> list[str]:
    """The task keys in dependency order (ties by position); [] when depends_on has a cycle."""
    tasks = job.get("tasks") or []
    deps = {t.get("task_key"): {d.get("task_key") for d in t.get("depends_on") or []} for t in tasks}
    order: list[str] = []
    while len(order) < len(deps):
        ready = [k for k in deps if k not in order and deps[k] <= set(order)]
        if not ready:
            return []
        order.append(ready[0])
    return order


def synced(bundle: Bundle, path: Path) -> bool:
    """False when the bundle's sync.exclude globs leave the file out of the workspace."""
    relpath = rel(bundle, path)
    excludes = (bundle.config.get("sync") or {}).get("exclude") or []
    return not any(fnmatch.fnmatch(relpath, g) or fnmatch.fnmatch(relpath, g.rstrip("*/") + "/*") for g in excludes)


def pyproject(root: Path) -> dict[str, Any]:
    return tomllib.loads((root / "pyproject.toml").read_text())


def wheel_name(root: Path) -> str:
    project = pyproject(root)["project"]
    return f"{project['name'].replace('-', '_')}-{project['version']}-py3-none-any.whl"


def file_problems(bundle: Bundle) -> list[str]:
    """python files, notebooks, wheel tasks and whl libraries point at what the repository builds."""
    problems = []
    project = pyproject(bundle.root)["project"]
    wheel = wheel_name(bundle.root)
    for name, job in (bundle.config.get("resources", {}).get("jobs") or {}).items():
        src = bundle.job_files[name]
        where = f"{rel(bundle, src)}: resources.jobs.{name}"
        for task in job.get("tasks") or []:
            key = task.get("task_key")
            if "spark_python_task" in task:
                file = (src.parent / task["spark_python_task"].get("python_file", "")).resolve()
                if not file.is_file():
                    problems.append(f"{where}: task {key!r}: python_file {rel(bundle, file)} does not exist")
                elif not synced(bundle, file):
                    problems.append(f"{where}: task {key!r}: python_file {rel(bundle, file)} is excluded by sync")
            if "notebook_task" in task:
                nb = (src.parent / task["notebook_task"].get("notebook_path", "")).resolve()
                if not nb.is_file():
                    problems.append(f"{where}: task {key!r}: notebook {rel(bundle, nb)} does not exist")
                    continue
                text = nb.read_text()
                if not text.startswith(NOTEBOOK_HEADER):
                    problems.append(f"{where}: task {key!r}: {rel(bundle, nb)} lacks {NOTEBOOK_HEADER!r}, so "
                                    "the bundle would upload it as a file, not a notebook")
                widgets = set(re.findall(r"dbutils\.widgets\.\w+\(\s*[\"']([^\"']+)[\"']", text))
                for param in (task["notebook_task"].get("base_parameters") or {}):
                    if param not in widgets:
                        problems.append(f"{where}: task {key!r}: base parameter {param!r} is not a widget of "
                                        f"{rel(bundle, nb)} ({sorted(widgets)})")
            if "python_wheel_task" in task:
                wt = task["python_wheel_task"]
                if wt.get("package_name") != project["name"]:
                    problems.append(f"{where}: task {key!r}: package_name {wt.get('package_name')!r} is not "
                                    f"{project['name']!r}")
                if wt.get("entry_point") not in (project.get("scripts") or {}):
                    problems.append(f"{where}: task {key!r}: entry_point {wt.get('entry_point')!r} is not one of "
                                    f"the wheel's [project.scripts] {sorted(project.get('scripts') or {})}")
            for lib in task.get("libraries") or []:
                if "whl" in lib and not lib["whl"].startswith(("/", "dbfs:")):
                    pattern = rel(bundle, (src.parent / lib["whl"]).resolve().parent) + "/" + Path(lib["whl"]).name
                    if not fnmatch.fnmatch(f"dist/{wheel}", pattern):
                        problems.append(f"{where}: task {key!r}: library {lib['whl']} does not match the wheel "
                                        f"make dist builds (dist/{wheel})")
    tool = pyproject(bundle.root).get("tool", {}).get("setuptools", {})
    for package in ["downpour", *tool.get("package-dir", {}).values()]:
        init = bundle.root / package / "__init__.py"
        if init.is_file() and synced(bundle, init):
            problems.append(f"sync: {package}/ is synced: the tasks must import the wheel, not a source folder "
                            "that would shadow it (add it to sync.exclude)")
    return problems + artifact_problems(bundle, wheel)


def artifact_problems(bundle: Bundle, wheel: str) -> list[str]:
    problems = []
    artifacts = bundle.config.get("artifacts") or {}
    wheels = {n: a for n, a in artifacts.items() if (a or {}).get("type") == "whl"}
    if not wheels:
        return ["artifacts: no whl artifact: the jobs' wheel would not be built and uploaded"]
    makefile = (bundle.root / "Makefile").read_text()
    for name, art in wheels.items():
        base = (bundle.root / art.get("path", ".")).resolve()
        if art.get("build") != "make dist" or not re.search(r"^dist:.*\n(?:\t.*\n)*\t.*wheel.*-w dist", makefile, re.M):
            problems.append(f"artifacts.{name}: build must be `make dist` (the Makefile's dist target that "
                            "writes the wheel to dist/)")
        for f in art.get("files") or []:
            pattern = rel(bundle, (base / f["source"]).parent) + "/" + Path(f["source"]).name
            if not fnmatch.fnmatch(f"dist/{wheel}", pattern):
                problems.append(f"artifacts.{name}: files {f['source']} does not match dist/{wheel}")
    return problems


# ---- the stages: jobs/, the Airflow DAGs, the downpour CLI -----------------------------------------------
def dag_stages(root: Path = ROOT) -> list[str]:
    """The Spark stages of the retraining DAG's ``>>`` chain (``stages["prepare"] >> ...``), then the
    scoring DAG's (``stage="score"``): the order a full run goes through jobs/."""
    def chain(node: ast.AST) -> list[ast.AST]:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.RShift):
            return chain(node.left) + chain(node.right)
        return [node]

    retrain = ast.parse((root / "dags" / "downpour_retrain.py").read_text())
    chains = [chain(n.value) for n in ast.walk(retrain) if isinstance(n, ast.Expr) and isinstance(n.value, ast.BinOp)]
    stages = [n.slice.value for c in chains for n in c
              if isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant)]
    score = ast.parse((root / "dags" / "downpour_score.py").read_text())
    stages += [kw.value.value for n in ast.walk(score) if isinstance(n, ast.Call) for kw in n.keywords
               if kw.arg == "stage" and isinstance(kw.value, ast.Constant)]
    return stages


def dag_timeouts(root: Path = ROOT) -> dict[str, float]:
    """``TIMEOUTS`` of dags/downpour_common.py in seconds, in its order (the stages)."""
    tree = ast.parse((root / "dags" / "downpour_common.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "TIMEOUTS" for t in node.targets):
            units = {"hours": 3600, "minutes": 60, "seconds": 1}
            return {k.value: sum(units[kw.arg] * ast.literal_eval(kw.value) for kw in v.keywords)
                    for k, v in zip(node.value.keys, node.value.values, strict=True)}
    raise AssertionError("dags/downpour_common.py: no TIMEOUTS")


def stage_call(bundle: Bundle, task: dict[str, Any]) -> tuple[str, list[str], Path | None] | None:
    """(stage, its arguments, the job script or None) of a task that runs a Downpour stage: a
    ``spark_python_task`` on ``jobs/<stage>.py``, or a ``python_wheel_task`` on the ``downpour`` command
    (``parameters: [<stage>, ...]``); None for any other task."""
    if "spark_python_task" in task:
        spt = task["spark_python_task"]
        file = (bundle.job_files[PIPELINE_JOB].parent / spt.get("python_file", "")).resolve()
        return file.stem, [str(a) for a in spt.get("parameters") or []], file
    wt = task.get("python_wheel_task") or {}
    params = [str(a) for a in wt.get("parameters") or []]
    if wt.get("entry_point") in (pyproject(bundle.root)["project"].get("scripts") or {}) and params:
        return params[0], params[1:], None
    return None


def stage_problems(bundle: Bundle) -> list[str]:
    job = (bundle.config.get("resources", {}).get("jobs") or {}).get(PIPELINE_JOB)
    if not job:
        return [f"resources.jobs.{PIPELINE_JOB}: the pipeline job is missing"]
    where = f"{rel(bundle, bundle.job_files[PIPELINE_JOB])}: resources.jobs.{PIPELINE_JOB}"
    expected = dag_stages(bundle.root)
    timeouts = dag_timeouts(bundle.root)
    problems = []
    if expected != list(timeouts):
        problems.append(f"dags/: the DAGs' stages {expected} are not the TIMEOUTS' {list(timeouts)}")
    tasks = {t["task_key"]: t for t in job.get("tasks") or [] if "task_key" in t}
    order = task_order(job)
    calls = {k: c for k in order if (c := stage_call(bundle, tasks.get(k, {}))) is not None}
    stages = [calls[k][0] for k in order if k in calls]
    if stages != expected:
        problems.append(f"{where}: stages {stages} (in depends_on order) are not jobs/ in the DAGs' order {expected}")
    for prev, key in zip(order, order[1:], strict=False):
        if [d.get("task_key") for d in tasks[key].get("depends_on") or []] != [prev]:
            problems.append(f"{where}: task {key!r} must depend on {prev!r} alone (a chain, as in the DAGs)")
    for key, (stage, args, file) in calls.items():
        task = tasks[key]
        if stage not in expected:
            continue
        if file is not None and file != (bundle.root / "jobs" / f"{stage}.py").resolve():
            problems.append(f"{where}: task {key!r} runs {rel(bundle, file)}, not jobs/{stage}.py")
        if error := cli_error(stage, [a for a in args if a != "--refusal-ok"]):  # jobs/evaluate.py's own
            problems.append(f"{where}: task {key!r}: `downpour {stage} {' '.join(args)}`: {error}")
        if args[:1] != ["--conf"]:
            problems.append(f"{where}: task {key!r}: parameters must start with --conf (jobs/ and the DAGs' job_args)")
        if stage == "evaluate" and ("--gate" not in args or "--refusal-ok" in args):
            problems.append(f"{where}: task {key!r}: evaluate must run the gate (--gate) and fail on a refusal "
                            "(no --refusal-ok: no publish step acts on it here)")
        if stage == "evaluate" and task.get("max_retries", 0) != 0:
            problems.append(f"{where}: task {key!r}: a refusal (exit 4) is a decision; max_retries must be 0")
        if stage == "score" and task.get("run_if", "ALL_SUCCESS") != "ALL_SUCCESS":
            problems.append(f"{where}: task {key!r}: score must run only when the gate promoted (ALL_SUCCESS)")
        if task.get("timeout_seconds") != timeouts.get(stage):
            problems.append(f"{where}: task {key!r}: timeout_seconds {task.get('timeout_seconds')} is not the DAGs' "
                            f"{timeouts.get(stage)}")
    return problems


def cli_error(stage: str, args: list[str]) -> str | None:
    """The downpour CLI's complaint about ``downpour <stage> ARGS`` (None: it parses)."""
    import contextlib
    import io

    from downpour.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args([stage, *args])
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "rejected"
    return None


# ---- secrets ----------------------------------------------------------------------------------------------
def secret_problems(bundle: Bundle) -> list[str]:
    from downpour.config import SECRET_KEY, PiiConfig

    salt_env = PiiConfig().salt_env
    problems = []

    def credential(key: str) -> bool:
        """A setting that holds a secret (not one that names it: a scope, pii.salt_env)."""
        return (salt_env in key or bool(SECRET_KEY.search(key))) and not NAMES_A_SECRET.search(key)

    def literal(value: Any) -> bool:
        return not (isinstance(value, str) and SECRET_REF.fullmatch(value.strip()))

    for path, doc in bundle.files.items():
        name = rel(bundle, path)
        for where, value in walk(doc):
            key = _setting(where)
            if key is not None and credential(key) and literal(value):
                problems.append(f"{name}: {dotted(where)}: {value!r} is a literal; a secret must come from a "
                                "secret scope: {{secrets/<scope>/<key>}}")
            # --set KEY=VALUE (a task parameter, a job parameter's default): the config's free-form settings
            # (spark.conf.*, input.options.*) and the salt
            m = re.match(r"^([A-Za-z0-9_.\-]+)=(.*)$", value) if isinstance(value, str) else None
            if m and (m.group(1).startswith(("spark.", "input.options.")) or salt_env in m.group(1)) \
                    and credential(m.group(1)) and literal(m.group(2)):
                problems.append(f"{name}: {dotted(where)}: {m.group(1)} is given a literal value; secrets come "
                                "from a secret scope")
    for job_name, job in (bundle.config.get("resources", {}).get("jobs") or {}).items():
        for i, param in enumerate(job.get("parameters") or []):
            if credential(str(param.get("name", ""))):
                problems.append(f"resources.jobs.{job_name}.parameters.{i}: job parameter {param.get('name')!r}: "
                                "parameters are shown with every run and secret references are not resolved "
                                "there; a secret goes in spark_env_vars as {{secrets/<scope>/<key>}}")
        for cluster in job.get("job_clusters") or []:
            env = (cluster.get("new_cluster") or {}).get("spark_env_vars") or {}
            if not isinstance(env.get(salt_env), str) or not SECRET_REF.fullmatch(env[salt_env]):
                problems.append(f"resources.jobs.{job_name}.job_clusters.{cluster.get('job_cluster_key')}: "
                                f"spark_env_vars.{salt_env} must be a secret reference {{{{secrets/<scope>/<key>}}}}")
    for target in bundle.config.get("targets") or {}:
        values = variable_values(bundle, target)
        for path, doc in bundle.files.items():
            for where, value in walk(doc):
                if isinstance(value, str) and SECRET_REF.fullmatch(value):
                    resolved = VAR_REF.sub(lambda m, v=values: str(v.get(m.group(1)) or ""), value)
                    if not re.fullmatch(r"\{\{secrets/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+\}\}", resolved):
                        problems.append(f"targets.{target}: {rel(bundle, path)}: {dotted(where)}: "
                                        f"{value!r} resolves to {resolved!r}, not a secret reference")
    return problems


FREE_FORM = {"spark_conf", "spark_env_vars", "base_parameters", "custom_tags", "tags"}


def _setting(where: tuple[Any, ...]) -> str | None:
    """The name of the setting a leaf is the value of, where names are free (not schema fields): a key of
    spark_conf / spark_env_vars / base_parameters / tags, or a variable (its default, a target's value)."""
    keys = list(where)
    if "variables" in keys:
        i = len(keys) - 1 - keys[::-1].index("variables")
        rest = keys[i + 1:]
        if len(rest) == 1 or (len(rest) == 2 and rest[1] == "default"):
            return str(rest[0])
        return None
    if len(keys) >= 2 and keys[-2] in FREE_FORM:
        return str(keys[-1])
    return None


def check(root: Path = ROOT, schema: Path = SCHEMA) -> list[str]:
    """Every problem of the bundle under ``root``; [] when it is valid."""
    bundle, problems = load(root)
    if not bundle.files:
        return problems
    problems += schema_problems(bundle, schema)
    problems += typed_problems(bundle)
    for rule in (target_problems, variable_problems, job_problems, file_problems, stage_problems, secret_problems):
        problems += rule(bundle)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=str(ROOT), help="the repository (default: this one)")
    args = parser.parse_args(argv)
    problems = check(Path(args.root).resolve())
    for p in problems:
        print(p, file=sys.stderr)
    print(f"bundle: {len(problems)} problem(s)" if problems else "bundle: valid")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
