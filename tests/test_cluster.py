"""A real Spark standalone cluster (master + 2 workers, separate JVMs) runs the pipeline; stop leaves nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Exactly the local run's settings (tests/test_spark_submit.py); only spark.master differs.
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


def _downpour(stage: str, overrides: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "downpour", stage, "--conf", str(ROOT / "conf" / "crm_telco.yaml"),
           *[x for o in overrides for x in ("--set", o)], *(["--gate"] if stage == "evaluate" else [])]
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
        overrides = [f"input.path={telco_path}", f"output.path={out}", *TINY, f"spark.master={state.master_url}"]
        for stage in ("prepare", "train", "evaluate"):
            proc = _downpour(stage, overrides, timeout=900)
            assert proc.returncode == 0, f"{stage}: {proc.stderr[-4000:]}"
        # Executors ran in the workers' JVMs (one app dir per application, on each worker)...
        for i in (1, 2):
            apps = list((tmp_path / "cluster" / f"work-{i}").glob("app-*"))
            assert len(apps) == 3, f"worker {i} ran executors for {len(apps)} of the 3 stages"
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
