"""Versions of the prepared data: staging directories with build numbers, published by
``storage.publish_dir`` (the product's one publisher) with the manifest as its last-written marker.

Layout under ``output.path``::

    .versions/<data_version>-<build>/      one complete, immutable prepared data set
        train/ val/ test/ quarantine/ feature_state.json manifest.json
    .versions/.staging-<data_version>-<uuid>/   a build in progress (never read by training)
    prepared -> .versions/<data_version>-<build>    a symlink, swapped with one os.replace

Local file systems (a plain path or ``file:``; not Databricks' FUSE mounts, which have no symlinks):
everything is written into a staging directory, the manifest last; the staging directory is renamed
to its version name, then a temporary symlink is ``os.replace``-d onto ``prepared`` (an atomic
rename(2)), the directory is fsync-ed, and only then are versions older than the previous one
removed. A crash at any point leaves ``prepared`` pointing at the last complete version; a leftover
``.staging-*`` directory is removed by the next successful publish.

Other file systems (``hdfs://``, ``s3a://``, ``dbfs:/``, ...) have no symlinks. There the version is
staged the same way, then published by Hadoop ``FileSystem.rename``: the old ``prepared/manifest.json``
is deleted first (so a reader never sees a manifest next to data it does not describe), the old
``prepared`` is renamed away, the staged directory is renamed to ``prepared`` and ``manifest.json`` is
written last. On HDFS each rename is atomic, so a reader sees either the old version, no version
(no manifest: not ready), or the new one; on object stores a directory rename is a copy, so readers
must treat a missing manifest as "not ready" -- which training does, because the manifest is
written last. One ``prepare`` per output path at a time (there is no cross-process lock).
"""

from __future__ import annotations

import contextlib
import re
import uuid
from dataclasses import dataclass
from typing import Any

from pyspark.sql import SparkSession

from downpour.layout import MANIFEST, VERSIONS
from downpour.layout import PREPARED as POINTER
from downpour.logs import LOG
from downpour.storage import HadoopFS, has_symlinks, join, publish_dir

_STAGING_PREFIX = ".staging-"


# ---- versions -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Staging:
    """A build in progress: write everything under ``url``; ``name`` is its final version name."""

    url: str
    name: str
    data_version: str
    build: int


class Publisher:
    """Stage, commit and clean up prepared data versions under one output path."""

    def __init__(self, spark: SparkSession, output_url: str) -> None:
        self.fs = HadoopFS(spark)
        self.root = self.fs.qualify(output_url)
        self.local = has_symlinks(self.root)  # the symlink swap; not on Databricks' FUSE mounts

    @property
    def prepared(self) -> str:
        return join(self.root, POINTER)

    @property
    def versions(self) -> str:
        return join(self.root, VERSIONS)

    def current_manifest(self) -> dict[str, Any] | None:
        """The manifest training would read now (None if nothing is published)."""
        return self.fs.read_json(join(self.prepared, MANIFEST))

    def stage(self, data_version: str) -> Staging:
        """Create a fresh staging directory for ``data_version`` (build number = 1 + the highest seen)."""
        builds = [0]
        for name, is_dir, _ in self.fs.list_dir(self.versions):
            m = re.fullmatch(rf"{re.escape(data_version)}-(\d+)", name)
            if is_dir and m:
                builds.append(int(m.group(1)))
        current = self.current_manifest() or {}
        if current.get("data_version") == data_version:
            builds.append(int(current.get("build", 0)))
        build = max(builds) + 1
        url = join(self.versions, f"{_STAGING_PREFIX}{data_version}-{build}-{uuid.uuid4().hex[:8]}")
        self.fs.mkdirs(url)
        return Staging(url=url, name=f"{data_version}-{build}", data_version=data_version, build=build)

    def final_url(self, staging: Staging) -> str:
        """Where the staged data will be readable once committed (what the manifest records)."""
        return join(self.versions, staging.name) if self.local else self.prepared

    def commit(self, staging: Staging, manifest: dict[str, Any]) -> str:
        """Publish the staged version with ``manifest`` written last (``storage.publish_dir``, the one
        publisher); returns the version's URL."""
        where = publish_dir(staging.url, self.prepared, staging.name, versions=self.versions,
                            marker=(MANIFEST, manifest), hadoop=None if self.local else self.fs,
                            drop_stale_staging=True, symlinks=self.local)
        LOG.info("published %s -> %s", self.prepared, where)
        return self.final_url(staging)

    def abort(self, staging: Staging) -> None:
        """Best effort: remove a staging directory after a failure (the published version is untouched)."""
        with contextlib.suppress(Exception):
            self.fs.delete(staging.url, recursive=True)
