"""Peak resident memory of the Python processes a stage runs: Spark's Python workers, Horovod ranks.

Memory bounds are a promise of this project (scoring and prepare stay flat on 10x the rows, training
reads shards instead of loading them), so benchmarks and tests need to see the workers' memory from
outside, without instrumenting them. :class:`PeakRSS` samples ``/proc`` in a background thread while a
stage runs and keeps, per process, the peak it saw. It also reads the kernel's own high-water mark
(``VmHWM``), so a spike between two samples is not missed: for processes born during the window all of
it, for processes that existed before (Spark reuses its Python workers) only when it rose above its
value at the start (an older high-water mark comes from earlier work). A process that existed before
and used no CPU during the window (an idle worker left by earlier jobs) is not counted at all.
Linux only (``/proc``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(command name, parent pid, CPU ticks used) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    comm = raw[raw.find("(") + 1: raw.rfind(")")]
    rest = raw[raw.rfind(")") + 2:].split()  # rest[0] is field 3 (state) of proc(5)
    try:
        return comm, int(rest[1]), int(rest[11]) + int(rest[12])  # utime + stime
    except (IndexError, ValueError):
        return None


def _status_kb(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in keys:
                    out[name] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _descendants(root: int) -> dict[int, tuple[str, int, int]]:
    """``{pid: (command name, parent pid, CPU ticks)}`` of every live process under ``root``."""
    procs: dict[int, tuple[str, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                procs[int(entry)] = st
    found: dict[int, tuple[str, int, int]] = {}
    frontier = {root}
    while frontier:
        children = {p for p, st in procs.items() if st[1] in frontier and p not in found}
        for p in children:
            found[p] = procs[p]
        frontier = children
    return found


@dataclass
class PeakRSS:
    """Context manager: the peak RSS (MiB) of each Python process under this one while it is open.

    ``peak_worker_mb`` is the largest single Python child (a Spark Python worker or a Horovod rank)
    that was born or did work during the window; ``driver_mb`` is the root process's own peak over the
    window. RSS counts shared pages too: a worker forked from ``pyspark.daemon`` starts with the
    daemon's pages (the imported pyspark, pandas, pyarrow), so compare peaks, not absolute sizes.
    """

    interval_s: float = 0.05
    root: int = field(default_factory=os.getpid)
    peaks_kb: dict[int, int] = field(default_factory=dict)
    kinds: dict[int, str] = field(default_factory=dict)
    driver_kb: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _before: dict[int, tuple[int, int]] = field(default_factory=dict)  # pid -> (VmHWM kB, CPU ticks)
    _comms: dict[int, str] = field(default_factory=dict)
    _root_hwm: int = 0

    def __enter__(self) -> PeakRSS:
        self._before = {pid: (_status_kb(pid, ("VmHWM",)).get("VmHWM", 0), st[2])
                        for pid, st in _descendants(self.root).items()}
        self._root_hwm = _status_kb(self.root, ("VmHWM",)).get("VmHWM", 0)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def _sample(self) -> None:
        own = _status_kb(self.root, ("VmRSS", "VmHWM"))
        hwm = own.get("VmHWM", 0)
        self.driver_kb = max(self.driver_kb, own.get("VmRSS", 0), hwm if hwm > self._root_hwm else 0)
        for pid, (comm, _, ticks) in _descendants(self.root).items():
            if self._comms.get(pid) != comm:
                # (Re)classify when first seen or when the command changed: a child seen between its
                # fork and its exec still shows its parent's name (java), and must not stay ignored.
                self._comms[pid] = comm
                cmd = _cmdline(pid)
                if "python" not in comm and "python" not in cmd.split(" ", 1)[0]:
                    self.kinds[pid] = ""  # the JVM, shells: not a Python worker
                else:
                    self.kinds[pid] = ("horovod" if "horovod" in cmd else "pyspark" if "pyspark" in cmd
                                       else "python")
            if not self.kinds[pid]:
                continue
            vm = _status_kb(pid, ("VmRSS", "VmHWM"))
            hwm_before, ticks_before = self._before.get(pid, (0, -1))
            if pid in self._before and ticks == ticks_before and pid not in self.peaks_kb:
                continue  # an idle worker from earlier jobs: not part of this window's work
            kb = max(vm.get("VmRSS", 0), vm.get("VmHWM", 0) if vm.get("VmHWM", 0) > hwm_before else 0)
            self.peaks_kb[pid] = max(self.peaks_kb.get(pid, 0), kb)

    @property
    def peak_worker_mb(self) -> float:
        return round(max(self.peaks_kb.values(), default=0) / 1024, 1)

    @property
    def driver_mb(self) -> float:
        return round(self.driver_kb / 1024, 1)

    def summary(self) -> dict[str, Any]:
        """Peaks by kind of worker, for logs and benchmark JSON."""
        by_kind: dict[str, float] = {}
        for pid, kb in self.peaks_kb.items():
            kind = self.kinds.get(pid) or "python"
            by_kind[kind] = max(by_kind.get(kind, 0.0), round(kb / 1024, 1))
        return {"peak_worker_mb": self.peak_worker_mb, "driver_mb": self.driver_mb,
                "workers_seen": len(self.peaks_kb), "peak_by_kind_mb": by_kind}

