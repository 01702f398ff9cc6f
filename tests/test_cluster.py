"""A real Spark standalone cluster (master + 2 workers, separate JVMs) runs the pipeline; stop leaves nothing."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Exactly the local run's settings (tests/test_spark_submit.py); only spark.master differs (so the session
# keeps Spark's 200 shuffle partitions, and the stages size their persisted frames to the input).
TINY = ["training.epochs=1", "training.workers=2", "evaluation.baseline=false"]


def _cluster_module():
    spec = importlib.util.spec_from_file_location("standalone_cluster", ROOT / "scripts" / "standalone_cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("standalone_cluster", module)
    spec.loader.exec_module(module)
    return module


sc = _cluster_module()


def test_process_tree_follows_children_that_left_the_group():
    """Horovod starts its workers with setsid: the tree walk must still find (and stop) them."""
    proc = subprocess.Popen(["bash", "-c", "setsid sleep 120 & sleep 120 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        tree: set[int] = set()
        while time.monotonic() < deadline and len(tree) < 3:
            tree = sc.process_tree([proc.pid])
            time.sleep(0.1)
        assert len(tree) == 3 and proc.pid in tree
        escaped = [p for p in tree if os.getpgid(p) != proc.pid]
        assert len(escaped) == 1  # the setsid'd sleep has its own group, yet it is in the tree
    finally:
        for pid in sc.process_tree([proc.pid]):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
    # SIGKILL is delivered asynchronously: give the orphaned sleep a moment to be torn down.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and [p for p in tree if sc.is_alive(p)]:
        time.sleep(0.05)
    assert not [p for p in tree if sc.is_alive(p)]


def test_stop_refuses_to_signal_a_process_that_is_not_ours(tmp_path):
    """A stale state file whose pid was reused by another program must not get that program killed."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        state = sc.ClusterState(master_url="spark://127.0.0.1:1", base_dir=str(tmp_path),
                                pids={"master": other.pid})
        assert sc.stop_processes(state, timeout=1) == set()
        assert sc.is_alive(other.pid)
    finally:
        other.kill()
        other.wait(timeout=10)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_local_dirs_are_distinct_per_daemon_and_exist_once_named(tmp_path):
    """Two workers sharing a missing SPARK_LOCAL_DIRS race to create it; the loser fails every executor.
    That the running daemons got these dirs is checked in their environments by the slow pipeline test."""
    cluster = sc.StandaloneCluster(workers=2, base_dir=str(tmp_path))
    dirs = [cluster.local_dir(name) for name in ("master", "worker-1", "worker-2")]
    assert len(set(dirs)) == 3 and all(d.is_dir() for d in dirs)


def _downpour(stage: str, overrides: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "downpour", stage, "--conf", str(ROOT / "conf" / "crm_telco.yaml"),
           *[x for o in overrides for x in ("--set", o)], *(["--gate"] if stage in ("evaluate", "run") else [])]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK_GATEWAY")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
def test_pipeline_on_a_standalone_cluster_then_nothing_left(telco_path, tmp_path):
    out = tmp_path / "out"
    cluster = sc.StandaloneCluster(workers=2, cores=1, memory="1g", base_dir=str(tmp_path / "cluster"),
                                   timeout=180)
    state = cluster.start()
    daemons = dict(state.pids)
    try:
        assert set(daemons) == {"master", "worker-1", "worker-2"}
        assert all(sc.is_alive(p) for p in daemons.values())
        assert state.master_url.startswith("spark://127.0.0.1:")
        # Each daemon got its own scratch dir, made before it started (a shared missing one is a race
        # that one worker loses for good: see StandaloneCluster.local_dir).
        local_dirs = [_environ(pid)["SPARK_LOCAL_DIRS"] for pid in daemons.values()]
        assert len(set(local_dirs)) == 3 and all(Path(d).is_dir() for d in local_dirs)
        overrides = [f"input.path={telco_path}", f"output.path={out}", *TINY, f"spark.master={state.master_url}"]
        # prepare, train and evaluate in one application (separate stage submissions are what
        # test_spark_submit.py checks; one application here saves two driver and four executor starts)
        proc = _downpour("run", overrides, timeout=900)
        assert proc.returncode == 0, f"run: {proc.stderr[-4000:]}"
        # Executors ran in the workers' JVMs (one app dir per application, on each worker)...
        for i in (1, 2):
            apps = list((tmp_path / "cluster" / f"work-{i}").glob("app-*"))
            assert len(apps) == 1, f"worker {i} ran executors for {len(apps)} applications, expected 1"
        # ...and the two Horovod ranks were tasks on those executors.
        card = json.loads((out / "model" / "model_card.json").read_text())
        assert card["training"]["workers"] == 2
        assert card["metrics"]["test"]["roc_auc"] > 0.6
        assert card["evaluation"]["gate"]["promoted"] is True
        tree = sc.process_tree(list(daemons.values()))
    finally:
        stopped = cluster.stop()
    assert set(daemons.values()) <= stopped
    assert tree <= stopped | {p for p in tree if not sc.is_alive(p)}
    left = [p for p in stopped | tree | set(daemons.values()) if sc.is_alive(p)]
    assert left == [], f"processes left behind: {left}"


@pytest.mark.slow
def test_cli_start_and_stop_by_state_file(tmp_path):
    """`standalone_cluster.py start` and `stop` as separate commands (what a user or CI script does)."""
    state_file = tmp_path / "cluster.json"
    script = str(ROOT / "scripts" / "standalone_cluster.py")
    start = subprocess.run([sys.executable, script, "start", "--workers", "1", "--state", str(state_file),
                            "--timeout", "180"], capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, start.stderr[-3000:]
    state = json.loads(state_file.read_text())
    pids = list(state["pids"].values())
    try:
        assert start.stdout.strip() == state["master_url"]
        assert len(pids) == 2 and all(sc.is_alive(p) for p in pids)
    finally:
        stop = subprocess.run([sys.executable, script, "stop", "--state", str(state_file)],
                              capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert not [p for p in pids if sc.is_alive(p)]
    assert not state_file.exists() and not Path(state["base_dir"]).exists()


# ---- executor loss --------------------------------------------------------------------------------
_EXECUTOR = "CoarseGrainedExecutorBackend"
_STARTED = re.compile(r"Running task [\d.]+ in stage [\d.]+ \(TID (\d+)\)")
_ENDED = re.compile(r"(?:Finished|Exception in|killed) task [\d.]+ in stage [\d.]+ \(TID (\d+)\)")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_machine_mid_task(worker: int, work_dir: Path, min_finished: int, stop: threading.Event,
                           found: dict, earlier_apps: frozenset[Path] = frozenset()) -> None:
    """Wait until the executor under ``worker`` has finished ``min_finished`` tasks (so it holds shuffle
    outputs and cached blocks) and is running one, then SIGKILL the worker JVM and everything under it.

    The executor is frozen (SIGSTOP) while its log is read, so "a task is running" cannot turn false
    between the check and the kill: its log ends with a task that started and never finished.
    Applications in ``earlier_apps`` (earlier attempts on the same cluster) are not watched.
    """
    executor = None
    found["watched"] = {"executor_seen": False, "logs": 0, "most_finished": 0, "in_flight_seen": 0}
    while not stop.is_set():
        if executor is None or not sc.is_alive(executor):
            executor = next((p for p in sc.process_tree([worker]) if _EXECUTOR in _cmdline(p)), None)
        logs = [p for p in work_dir.glob("app-*/*/stderr") if p.parents[1] not in earlier_apps]
        found["watched"].update(executor_seen=found["watched"]["executor_seen"] or executor is not None,
                                logs=len(logs))
        if executor is not None and len(logs) == 1:
            try:
                os.kill(executor, signal.SIGSTOP)
            except ProcessLookupError:
                executor = None
                continue
            try:
                text = logs[0].read_text(errors="replace")
                started, ended = set(_STARTED.findall(text)), set(_ENDED.findall(text))
                seen = found["watched"]
                seen["most_finished"] = max(seen["most_finished"], len(ended))
                seen["in_flight_seen"] += bool(started - ended)
                if started - ended and len(ended) >= min_finished:
                    tree = sc.process_tree([worker])
                    for pid in tree:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    found.update(in_flight=sorted(started - ended), finished=len(ended), killed=tree,
                                 executor=executor)
                    return
            finally:
                if "killed" not in found:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(executor, signal.SIGCONT)
        stop.wait(0.02)


def _published_shards(out: Path) -> tuple[dict, dict[str, dict[str, str]]]:
    """(manifest, {split: {file: sha256}}), checking the files on disk against the manifest."""
    manifest = json.loads((out / "prepared" / "manifest.json").read_text())
    sums: dict[str, dict[str, str]] = {}
    for split in ("train", "val", "test"):
        listed = manifest["splits"][split]["checksums"]
        files = {p.name: p for p in (out / "prepared" / split).glob("*.parquet")}
        assert sorted(files) == sorted(listed), f"{split}: files on disk differ from the manifest"
        for name, path in files.items():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == listed[name], f"{split}/{name}"
        sums[split] = listed
    return manifest, sums


@pytest.mark.slow
def test_losing_a_worker_mid_prepare_changes_no_shard(spark, telco_path, tmp_path):
    """Losing a machine during `prepare` on a standalone cluster: the run still succeeds, and its shards
    are the same as an undisturbed run's.

    "A machine" is worker 1's whole process tree, SIGKILLed together: the worker daemon JVM, the
    executor JVM it launched and anything under that. (Killing the executor alone models a crashed
    JVM on a live machine: its worker would launch a new executor in its place. Killing the daemon
    alone leaves an orphaned executor that only dies once it notices.) The kill lands while a task
    runs on that executor, after it has finished several (so shuffle outputs and cached blocks die
    with it); the driver log must show the executor lost and that very task failed with
    ``ExecutorLostFailure``, so the test cannot pass without a loss. Spark reruns the lost work on
    worker 2.

    The reference is the same prepare in this process's local session (another JVM, another
    partitioning): the manifests' per-file SHA-256s must be equal, and equal to the files on disk.
    """
    from downpour.config import load_config
    from downpour.pipelines.prepare import run_prepare

    run_prepare(spark, load_config(ROOT / "conf" / "crm_telco.yaml",
                                   [f"input.path={telco_path}", f"output.path={tmp_path / 'reference'}"]))
    ref_manifest, ref_shards = _published_shards(tmp_path / "reference")

    cluster = sc.StandaloneCluster(workers=2, cores=1, memory="1g", base_dir=str(tmp_path / "cluster"),
                                   timeout=180)
    state = cluster.start()
    daemons = dict(state.pids)
    stop, killed = threading.Event(), {}
    proc = None
    try:
        # A Telco prepare is short: on a busy machine worker 1 may not have a task in flight after 12
        # finished ones before the run ends. Such an undisturbed run proves nothing here, so it is run
        # again (a new application on the same, intact cluster), at most three times in all.
        for attempt in range(3):
            out, log = tmp_path / f"out-{attempt}", tmp_path / f"driver-{attempt}.log"
            work_dir = tmp_path / "cluster" / "work-1"
            killed.clear()
            stop.clear()
            watcher = threading.Thread(target=_kill_machine_mid_task, daemon=True, args=(
                daemons["worker-1"], work_dir, 12, stop, killed, frozenset(work_dir.glob("app-*"))))
            cmd = [sys.executable, "-m", "downpour", "prepare", "--conf", str(ROOT / "conf" / "crm_telco.yaml"),
                   "--set", f"input.path={telco_path}", "--set", f"output.path={out}",
                   "--set", f"spark.master={state.master_url}"]
            env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK_GATEWAY")}
            env["DOWNPOUR_SPARK_LOG_LEVEL"] = "INFO"  # the driver's account of the loss and the retries
            with open(log, "wb") as fh:
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
                watcher.start()
                rc = proc.wait(timeout=900)
            stop.set()
            watcher.join(timeout=30)
            text = log.read_text(errors="replace")
            if "killed" in killed:
                break
            assert rc == 0, f"undisturbed prepare (attempt {attempt + 1}) failed:\n{text[-4000:]}"
        assert "killed" in killed, ("three prepares ended before worker 1's executor had a task in flight after "
                                    f"12 finished: nothing was killed; the watcher saw {killed.get('watched')}")
        assert not [p for p in killed["killed"] if sc.is_alive(p)]
        assert rc == 0, f"prepare did not survive the loss of a worker:\n{text[-4000:]}"
        assert "Lost executor" in text
        for tid in killed["in_flight"]:  # the task running at the kill failed with its executor
            assert re.search(rf"\(TID {tid}\)[^\n]*(?:ExecutorLostFailure|its executor exited)", text), tid
        assert "Shuffle files lost for" in text  # the outputs of its finished tasks had to be redone
        manifest, shards = _published_shards(out)
        assert manifest["counts"] == ref_manifest["counts"]
        for split in ("train", "val", "test"):
            assert shards[split] == ref_shards[split], f"{split}: checksums differ from the undisturbed run"
        tree = sc.process_tree(list(daemons.values()))
    finally:
        stop.set()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        stopped = cluster.stop()
    assert tree <= stopped | {p for p in tree if not sc.is_alive(p)}
    left = [p for p in stopped | tree | killed.get("killed", set()) | set(daemons.values()) if sc.is_alive(p)]
    assert left == [], f"processes left behind: {left}"
