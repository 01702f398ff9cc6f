"""A real multi-process Spark standalone cluster on 127.0.0.1, from the PySpark installed in the venv.

One master and N workers (separate JVMs started with ``spark-class``), each worker offering a small
amount of memory and 1 core, so a job sees exactly what it would see on a real cluster: executors in
other processes, shuffles over the network, Horovod workers running as executor tasks. Used by
``make cluster-demo`` and tests/test_cluster.py; handy to try a config on "a cluster" before a real one.

    python scripts/standalone_cluster.py start --state /tmp/dp-cluster.json   # prints the master URL
    downpour run --conf conf/crm_telco.yaml --set spark.master=spark://127.0.0.1:PORT
    python scripts/standalone_cluster.py stop --state /tmp/dp-cluster.json
    python scripts/standalone_cluster.py demo --conf conf/crm_telco.yaml --set training.epochs=1

Ports are chosen by the OS (port 0) and read back from the daemons' logs, so nothing collides with
whatever else runs here. Every wait is bounded. ``stop`` kills the whole process tree (the daemons,
the executors they launched, and anything those started) and checks, by pid, that none is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
_MASTER_URL = re.compile(r"Starting Spark master at (spark://[\w.\-]+:\d+)")
_LEADER = "I have been elected leader"
_REGISTERED = "Successfully registered with master"


class ClusterError(RuntimeError):
    """The cluster did not come up (or go down) as asked; the message points at the log to read."""


def spark_home() -> Path:
    """The PySpark package folder: it ships bin/spark-class and the jars a standalone cluster needs."""
    import pyspark

    home = Path(pyspark.__file__).resolve().parent
    if not (home / "bin" / "spark-class").is_file() or not (home / "jars").is_dir():
        raise ClusterError(f"{home} has no bin/spark-class or jars/: is this a full PySpark install?")
    return home


@dataclass
class ClusterState:
    """What `stop` needs, also written to a JSON file so start and stop can be separate commands."""

    master_url: str
    base_dir: str
    pids: dict[str, int] = field(default_factory=dict)  # "master", "worker-1", ... -> pid (== pgid)
    own_base_dir: bool = True

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClusterState:
        return cls(**json.loads(Path(path).read_text()))


# ---- processes --------------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a live process from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2])


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, already dead but not yet reaped, counts as gone)."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def process_tree(roots: Sequence[int]) -> set[int]:
    """The live pids in the trees under ``roots``, plus members of their process groups.

    The process group catches executors after their worker died (they are re-parented); the parent
    walk catches what escaped the group with setsid (Horovod launches its workers that way).
    """
    procs: dict[int, tuple[str, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[0] not in ("Z", "X"):
                procs[int(entry)] = st
    groups = set(roots)
    found = {p for p in roots if p in procs} | {p for p, st in procs.items() if st[2] in groups}
    changed = True
    while changed:
        children = {p for p, st in procs.items() if st[1] in found} - found
        changed = bool(children)
        found |= children
    return found


def _looks_like_ours(pid: int, base_dir: str) -> bool:
    """Guard against pid reuse: only signal a JVM of this cluster (its command line names our dir)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "org.apache.spark.deploy" in cmd and base_dir in cmd


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    alive = {p for p in pids if is_alive(p)}
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = {p for p in alive if is_alive(p)}
    return alive


def _wait_for_log(log: Path, pattern: str | re.Pattern[str], proc: subprocess.Popen[bytes] | None,
                  timeout: float, what: str, count: int = 1) -> list[str]:
    """Poll a daemon log until ``pattern`` appears ``count`` times; fail early if the process died."""
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        hits = [m.group(1) if m.groups() else m.group(0) for m in regex.finditer(text)]
        if len(hits) >= count:
            return hits
        if proc is not None and proc.poll() is not None:
            raise ClusterError(f"{what} exited with code {proc.returncode} before it was ready; see {log}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{what} not ready after {timeout:.0f}s; see {log}")
        time.sleep(0.25)


# ---- the cluster ------------------------------------------------------------------------------------
class StandaloneCluster:
    """Start a master and ``workers`` workers; ``stop`` leaves no process behind.

    >>> with StandaloneCluster(workers=2) as cluster:
    ...     subprocess.run(["downpour", "run", "--conf", "conf/x.yaml", "--set",
    ...                     f"spark.master={cluster.master_url}"], check=True)
    """

    def __init__(self, workers: int = 2, cores: int = 1, memory: str = "1g", base_dir: str | None = None,
                 daemon_memory: str = "256m", timeout: float = 120.0) -> None:
        if workers < 1 or cores < 1:
            raise ValueError("workers and cores must be >= 1")
        self.workers, self.cores, self.memory = workers, cores, memory
        self.daemon_memory, self.timeout = daemon_memory, timeout
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="downpour-cluster-")).resolve()
        self.state: ClusterState | None = None
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def master_url(self) -> str:
        if self.state is None:
            raise ClusterError("the cluster is not started")
        return self.state.master_url

    def _env(self) -> dict[str, str]:
        home = spark_home()
        conf_dir = self.base_dir / "conf"  # an empty conf dir: no stray spark-env.sh / defaults
        conf_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        for var in ("PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET", "SPARK_MASTER_HOST", "SPARK_WORKER_OPTS"):
            env.pop(var, None)
        env.update({
            "SPARK_HOME": str(home),
            "SPARK_CONF_DIR": str(conf_dir),
            "SPARK_LOCAL_IP": "127.0.0.1",
            "SPARK_LOG_DIR": str(self.base_dir / "logs"),
            "SPARK_DAEMON_MEMORY": self.daemon_memory,
            "SPARK_NO_DAEMONIZE": "1",
            # The executors run Python with the interpreter of this environment.
            "PYSPARK_PYTHON": env.get("PYSPARK_PYTHON", sys.executable),
        })
        return env

    def local_dir(self, name: str) -> Path:
        """The daemon's own scratch dir (SPARK_LOCAL_DIRS), created before it starts.

        Spark's worker creates a missing local root with ``exists() || mkdirs()``: two workers sharing a
        missing root race, the loser's ``mkdirs`` returns false, it caches an empty list of local dirs
        and fails every executor launch (the master then removes the application after 10 failures).
        """
        path = self.base_dir / f"local-{name}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
        env = {**env, "SPARK_LOCAL_DIRS": str(self.local_dir(name))}
        log = self.base_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [str(spark_home() / "bin" / "spark-class"), *args], env=env, stdout=fh,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.base_dir,
                start_new_session=True,  # its own process group: stop signals the whole group
            )
        self._procs.append(proc)
        assert self.state is not None
        self.state.pids[name] = proc.pid
        return proc, log

    def start(self) -> ClusterState:
        """Start the master, then the workers; return once every worker has registered."""
        env = self._env()
        self.state = ClusterState(master_url="", base_dir=str(self.base_dir), own_base_dir=self._own_dir)
        try:
            master, log = self._spawn("master", [MASTER_CLASS, "--host", "127.0.0.1", "--port", "0",
                                                 "--webui-port", "0"], env)
            self.state.master_url = _wait_for_log(log, _MASTER_URL, master, self.timeout, "Spark master")[0]
            _wait_for_log(log, _LEADER, master, self.timeout, "Spark master (leader election)")
            for i in range(1, self.workers + 1):
                work = self.base_dir / f"work-{i}"
                work.mkdir(parents=True, exist_ok=True)
                self._spawn(f"worker-{i}", [
                    WORKER_CLASS, "--host", "127.0.0.1", "--port", "0", "--webui-port", "0",
                    "--cores", str(self.cores), "--memory", self.memory, "--work-dir", str(work),
                    self.state.master_url,
                ], env)
            for i, proc in enumerate(self._procs[1:], start=1):
                _wait_for_log(self.base_dir / "logs" / f"worker-{i}.log", _REGISTERED, proc, self.timeout,
                              f"Spark worker {i}")
        except BaseException:
            self.stop()
            raise
        return self.state

    def stop(self, timeout: float = 20.0) -> set[int]:
        """Stop everything started; returns the pids that were stopped. Raises if any survives."""
        if self.state is None:
            return set()
        stopped = stop_processes(self.state, timeout=timeout)
        for proc in self._procs:  # reap our direct children so they are not left as zombies
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._procs.clear()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        self.state = None
        return stopped

    def __enter__(self) -> StandaloneCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_processes(state: ClusterState, timeout: float = 20.0) -> set[int]:
    """SIGTERM the daemons' process trees, SIGKILL what is left after ``timeout``; verify by pid."""
    roots = [pid for pid in state.pids.values() if is_alive(pid) and _looks_like_ours(pid, state.base_dir)]
    tree = process_tree(roots)
    # Workers first, so they do not relaunch executors while the master goes away.
    for _name, pid in sorted(state.pids.items(), key=lambda kv: kv[0] == "master"):
        if pid in roots:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
    left = _wait_gone(tree, timeout)
    tree |= process_tree(roots)  # anything started while we were stopping
    for pid in sorted(left | {p for p in tree if is_alive(p)}):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    left = _wait_gone(tree, 10.0)
    if left:
        raise ClusterError(f"processes still alive after SIGKILL: {sorted(left)}")
    return tree


# ---- command line -----------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    """Start a cluster, run prepare/train/evaluate on it with only the master URL changed, stop it."""
    downpour = [sys.executable, "-m", "downpour"]
    overrides = [x for s in args.overrides for x in ("--set", s)]
    with StandaloneCluster(workers=args.workers, memory=args.memory, timeout=args.timeout) as cluster:
        print(f"cluster up: {cluster.master_url} ({args.workers} workers x 1 core, {args.memory})", flush=True)
        master = ["--set", f"spark.master={cluster.master_url}"]
        for stage in ("prepare", "train", "evaluate"):
            cmd = [*downpour, stage, "--conf", args.conf, *overrides, *master,
                   *(["--gate"] if stage == "evaluate" else [])]
            print("+", " ".join(cmd), flush=True)
            rc = subprocess.run(cmd, timeout=args.stage_timeout).returncode
            if rc != 0:
                print(f"cluster-demo: {stage} exited with {rc}", file=sys.stderr)
                return rc
    print("cluster stopped; no process left behind", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="standalone_cluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "demo"):
        p = sub.add_parser(name)
        p.add_argument("--workers", type=int, default=2)
        p.add_argument("--memory", default="1g", help="memory each worker offers (default 1g)")
        p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each daemon")
    sub.choices["start"].add_argument("--state", required=True, help="JSON file that `stop` reads")
    sub.choices["start"].add_argument("--base-dir", default=None, help="logs, work and local dirs (default: tmp)")
    stop = sub.add_parser("stop")
    stop.add_argument("--state", required=True)
    demo = sub.choices["demo"]
    demo.add_argument("--conf", default=str(ROOT / "conf" / "crm_telco.yaml"))
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--stage-timeout", type=float, default=900.0, help="seconds allowed per stage")
    args = parser.parse_args(argv)

    try:
        if args.command == "start":
            cluster = StandaloneCluster(workers=args.workers, memory=args.memory, base_dir=args.base_dir,
                                        timeout=args.timeout)
            state = cluster.start()
            state.save(args.state)
            print(state.master_url)
            return 0
        if args.command == "stop":
            state = ClusterState.load(args.state)
            stopped = stop_processes(state)
            if state.own_base_dir:
                shutil.rmtree(state.base_dir, ignore_errors=True)
            Path(args.state).unlink(missing_ok=True)
            print(f"stopped {len(stopped)} processes")
            return 0
        return _demo(args)
    except (ClusterError, subprocess.TimeoutExpired, FileNotFoundError) as exc:
        print(f"standalone_cluster {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
