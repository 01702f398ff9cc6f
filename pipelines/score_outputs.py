"""The outputs of ``downpour score``: staged, then published only once every input row is accounted for.

A scoring run writes its scores and its quarantine into staging directories beside ``--output``; the
drift figures, the independent record count and the row accounting run against those; only then are
both directories published by ``storage.publish_dir`` (the product's one publisher: a symlink swap on
local disks, renames elsewhere) and the summary written last. So a run that fails, at any step, leaves
the previous run's scores, quarantine and summary as they were, and a reader never sees a partial
directory or a summary beside scores it does not describe (the old summary is removed before the
first directory is swapped).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

from pyspark.sql import SparkSession

from downpour import storage
from downpour.layout import ScoringLayout
from downpour.logs import LOG
from downpour.storage import HadoopFS, has_symlinks


class ScoreOutputs:
    """Where a scoring run writes (``staged``), how it publishes (``publish``) or cleans up after a failure."""

    def __init__(self, spark: SparkSession, output_url: str) -> None:
        self.layout = ScoringLayout(output_url)
        self.fs = HadoopFS(spark)
        self.local = has_symlinks(self.layout.scores)
        tag = uuid.uuid4().hex[:12]
        self.version = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{tag}"
        self._staged = {url: self._staging(url, tag) for url in (self.layout.scores, self.layout.quarantine)}

    def _staging(self, url: str, tag: str) -> str:
        """A directory Spark writes into, on the file system of ``url``: inside its versions directory
        locally (published by a rename there), else beside it."""
        if self.local:
            path = storage.local_path(url)
            versions = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.versions")
            return "file://" + os.path.join(versions, f".staging-{tag}")
        return f"{url.rstrip('/')}.staging-{tag}"

    def staged(self, url: str) -> str:
        """The Spark URL to write ``url``'s new contents to (the scores or the quarantine)."""
        return self._staged[url]

    def publish(self) -> None:
        """Both directories appear at their URLs, each in one step; the old summary goes first."""
        storage.delete_file(self.layout.summary)
        for url, staging in self._staged.items():
            where = storage.publish_dir(storage.local_path(staging) if self.local else staging, url,
                                        self.version, hadoop=None if self.local else self.fs,
                                        drop_stale_staging=True, symlinks=self.local)
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
