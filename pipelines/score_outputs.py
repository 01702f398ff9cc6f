"""The outputs of ``downpour score``: staged, then published only once every input row is accounted for.

A scoring run writes its scores and its quarantine into staging directories in a hidden
``.<name>.versions/`` beside each; the drift figures, the independent record count, the row accounting
and the history roll-forward run before either is published. Then ``storage.publish_dir`` (the
product's one publisher: a symlink swap on local disks, renames through Hadoop elsewhere) publishes
the scores and the quarantine, the old summary removed first and the new one written last. A run that
fails before publishing leaves the previous run's outputs as they were; a crash while publishing leaves
no summary, which says "not complete". One run per output at a time (the next publish clears stale
staging directories).

The two directories' URLs follow Spark's rules, as prepare's do: a path without a scheme is on the
cluster's default file system (``HadoopFS.qualify``); only ``file:`` paths off Databricks' FUSE mounts are
published by a symlink swap. The summary goes through the driver's Python (``storage``), for which such a
path is local: the README asks for a scheme on clusters.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

from pyspark.sql import SparkSession

from downpour import storage
from downpour.layout import ScoringLayout
from downpour.logs import LOG
from downpour.storage import HadoopFS, has_symlinks


def versions_dir(url: str) -> str:
    """``.<name>.versions`` beside ``url``: its published versions (local), staging and retired trees.
    Hidden, so a reader of the parent (e.g. partitioned scores ``dt=...``) never lists them."""
    parent, _, name = url.rstrip("/").rpartition("/")
    return f"{parent}/.{name}.versions"


class ScoreOutputs:
    """Where a scoring run writes (``staged``), how it publishes (``publish``) or cleans up after a failure."""

    def __init__(self, spark: SparkSession, output_url: str) -> None:
        self.layout = ScoringLayout(output_url)
        self.fs = HadoopFS(spark)
        self._final = {name: self.fs.qualify(url) for name, url in
                       (("scores", self.layout.scores), ("quarantine", self.layout.quarantine))}
        self.local = has_symlinks(self._final["scores"])
        tag = uuid.uuid4().hex[:12]
        self.version = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{tag}"
        self._staged = {name: f"{versions_dir(url)}/.staging-{tag}" for name, url in self._final.items()}

    def staged(self, name: str) -> str:
        """The URL Spark writes ``name`` ("scores" or "quarantine") into."""
        return self._staged[name]

    def publish(self) -> None:
        """Both directories appear at their URLs, each in one step; the old summary goes first."""
        storage.delete_file(self.layout.summary)
        for name, url in self._final.items():
            where = storage.publish_dir(self._staged[name], url, self.version, versions=versions_dir(url),
                                        hadoop=None if self.local else self.fs, drop_stale_staging=True,
                                        symlinks=self.local)
            LOG.info("score: published %s -> %s", url, where)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """The run's summary, written last: its presence says the outputs beside it are this run's."""
        storage.write_json_atomic(self.layout.summary, summary)

    @contextlib.contextmanager
    def removed_on_failure(self) -> Iterator[None]:
        """Around the run: when it fails, what it staged is removed (the published outputs are untouched)."""
        try:
            yield
        except BaseException:
            for staging in self._staged.values():
                with contextlib.suppress(Exception):
                    self.fs.delete(staging, recursive=True)
            raise


def remove_outputs(output_url: str) -> None:
    """Delete a scoring run's outputs and their versions (local or FUSE paths), e.g. between benchmark
    rounds: ``<output>``, ``<output>_quarantine``, ``<output>_summary.json``."""
    layout = ScoringLayout(output_url)
    for url in (layout.scores, layout.quarantine):
        storage.delete_dir(url)
        storage.delete_dir(versions_dir(storage.local_path(url)))
    storage.delete_file(layout.summary)
