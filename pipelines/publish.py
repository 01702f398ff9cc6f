"""Atomic, idempotent publication of a prepared data version, on any Hadoop-compatible file system.

Layout under ``output.path``::

    .versions/<data_version>-<build>/      one complete, immutable prepared data set
        train/ val/ test/ quarantine/ feature_state.json manifest.json
    .versions/.staging-<data_version>-<uuid>/   a build in progress (never read by training)
    prepared -> .versions/<data_version>-<build>    a symlink, swapped with one os.replace

Local file systems (a plain path or ``file:``): everything is written into a staging directory, the
manifest last; the staging directory is renamed to its version name, then a temporary symlink is
``os.replace``-d onto ``prepared`` (an atomic rename(2)), the directory is fsync-ed, and only then are
versions older than the previous one removed. A crash at any point leaves ``prepared`` pointing at the
last complete version; a leftover ``.staging-*`` directory is removed by the next successful publish.

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
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from pyspark.sql import SparkSession

from downpour.fsutil import swap_symlink
from downpour.logs import LOG

VERSIONS = ".versions"
POINTER = "prepared"
MANIFEST = "manifest.json"
_STAGING_PREFIX = ".staging-"


# ---- URLs ------------------------------------------------------------------------------------------
def is_local(url: str) -> bool:
    """A ``file:`` URL (qualify scheme-less paths first with ``HadoopFS.qualify``)."""
    return urlparse(url).scheme in ("", "file")


def local_path(url: str) -> str:
    """``file:///a/b``, ``file:/a/b`` or ``a/b`` -> absolute local path."""
    if url.startswith("file:"):
        url = urlparse(url).path
    return os.path.abspath(url)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    mtime: int  # milliseconds since the epoch, as Hadoop reports it


# ---- Hadoop FileSystem through the JVM --------------------------------------------------------------
class HadoopFS:
    """The few Hadoop ``FileSystem`` calls the pipeline needs, for any URL Spark can read.

    Small files we write ourselves (manifest, markers) go through Python on local paths (atomic
    tmp + os.replace, no Hadoop ``.crc`` side files) and through ``FileSystem.create`` elsewhere.
    """

    def __init__(self, spark: SparkSession) -> None:
        self._jvm = spark.sparkContext._jvm
        self._conf = spark.sparkContext._jsc.hadoopConfiguration()

    def _p(self, url: str) -> Any:
        return self._jvm.org.apache.hadoop.fs.Path(url)

    def _fs(self, url: str) -> tuple[Any, Any]:
        p = self._p(url)
        return p.getFileSystem(self._conf), p

    def qualify(self, url: str) -> str:
        """Fully qualified URL (``file:/abs/p``, ``hdfs://nn:8020/p``): a scheme-less path means the
        cluster's default file system, as it does for Spark; a relative local one is made absolute."""
        p = self._p(url)
        fs = p.getFileSystem(self._conf)
        if not urlparse(url).scheme and fs.getUri().getScheme() == "file":
            p = self._p(os.path.abspath(url))
        return str(fs.makeQualified(p).toString())

    def exists(self, url: str) -> bool:
        fs, p = self._fs(url)
        return bool(fs.exists(p))

    def is_dir(self, url: str) -> bool:
        fs, p = self._fs(url)
        return bool(fs.exists(p) and fs.getFileStatus(p).isDirectory())

    def mkdirs(self, url: str) -> None:
        fs, p = self._fs(url)
        fs.mkdirs(p)

    def delete(self, url: str, recursive: bool = True) -> bool:
        fs, p = self._fs(url)
        return bool(fs.delete(p, recursive))

    def rename(self, src: str, dst: str) -> None:
        fs, p = self._fs(src)
        if not fs.rename(p, self._p(dst)):
            raise OSError(f"could not rename {src} -> {dst}")

    def list_dir(self, url: str) -> list[tuple[str, bool, int]]:
        """(name, is_dir, size) of the direct children; [] when the directory does not exist."""
        fs, p = self._fs(url)
        if not fs.exists(p):
            return []
        return [(st.getPath().getName(), bool(st.isDirectory()), int(st.getLen())) for st in fs.listStatus(p)]

    def list_files(self, url: str) -> list[FileInfo]:
        """Every data file under a path, directory or glob; hidden files (``_*``, ``.*``) skipped."""
        fs, p = self._fs(url)
        statuses = fs.globStatus(p)
        out: list[FileInfo] = []
        for st in statuses or []:
            if st.isDirectory():
                root = st.getPath().toString().rstrip("/")
                it = fs.listFiles(st.getPath(), True)
                while it.hasNext():
                    f = it.next()
                    path = f.getPath().toString()
                    if not _hidden(path[len(root):]):
                        out.append(FileInfo(path, int(f.getLen()), int(f.getModificationTime())))
            elif not _hidden(st.getPath().getName()):
                out.append(FileInfo(st.getPath().toString(), int(st.getLen()), int(st.getModificationTime())))
        return sorted(out, key=lambda f: f.path)

    def write_bytes(self, url: str, data: bytes) -> None:
        """Write a small file whole; on local paths atomically (tmp file + fsync + os.replace)."""
        if is_local(url):
            path = local_path(url)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            return
        fs, p = self._fs(url)
        out = fs.create(p, True)
        try:
            out.write(bytearray(data))
        finally:
            out.close()

    def read_bytes(self, url: str) -> bytes:
        if is_local(url):
            with open(local_path(url), "rb") as fh:
                return fh.read()
        fs, p = self._fs(url)
        stream = fs.open(p)
        try:
            return bytes(self._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
        finally:
            stream.close()

    def write_json(self, url: str, obj: Any) -> None:
        self.write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def read_json(self, url: str) -> Any | None:
        """The parsed JSON file, or None when it does not exist or is not valid JSON (a torn write)."""
        try:
            if not self.exists(url):
                return None
            return json.loads(self.read_bytes(url))
        except (OSError, ValueError):
            return None


def _hidden(relative: str) -> bool:
    """Spark's rule: a path component starting with ``_`` or ``.`` is hidden (``k=v`` dirs are not)."""
    parts = [p for p in relative.split("/") if p]
    return any((p.startswith(("_", ".")) and "=" not in p) for p in parts)


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
        self.local = is_local(self.root)

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
        """Publish the staged version with ``manifest`` written last; returns the version's URL."""
        if self.local:
            return self._commit_local(staging, manifest)
        return self._commit_remote(staging, manifest)

    def abort(self, staging: Staging) -> None:
        """Best effort: remove a staging directory after a failure (the published version is untouched)."""
        with contextlib.suppress(Exception):
            self.fs.delete(staging.url, recursive=True)

    # -- local: symlink swap ---------------------------------------------------------------------------
    def _commit_local(self, staging: Staging, manifest: dict[str, Any]) -> str:
        self.fs.write_json(join(staging.url, MANIFEST), manifest)
        final = join(self.versions, staging.name)
        os.rename(local_path(staging.url), local_path(final))
        previous = self._pointer_target()
        self._swap_pointer(f"{VERSIONS}/{staging.name}")
        self._cleanup_local(keep={staging.name} | ({previous} if previous else set()))
        LOG.info("published %s -> %s", self.prepared, final)
        return final

    def _pointer_target(self) -> str | None:
        """The version name ``prepared`` points at now (None if it is not a symlink into .versions)."""
        link = os.path.join(local_path(self.root), POINTER)
        if not os.path.islink(link):
            return None
        target = os.readlink(link)
        return os.path.basename(target.rstrip("/")) if os.path.dirname(target) == VERSIONS else None

    def _swap_pointer(self, target: str) -> None:
        """Atomically point ``prepared`` at ``target`` (relative to the output root)."""
        root = local_path(self.root)
        swap_symlink(os.path.join(root, POINTER), target, legacy_dir=os.path.join(root, VERSIONS))

    def _cleanup_local(self, keep: set[str]) -> None:
        """Keep the new version and the one it replaced (readers may still hold it); drop the rest,
        including staging directories that crashed runs left behind."""
        for e in os.scandir(local_path(self.versions)):
            if e.name in keep or not e.is_dir(follow_symlinks=False):
                continue
            shutil.rmtree(e.path, ignore_errors=True)
        for name in os.listdir(local_path(self.root)):
            if name.startswith(f".{POINTER}.tmp-"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(local_path(self.root), name))

    # -- remote: rename via Hadoop ---------------------------------------------------------------------
    def _commit_remote(self, staging: Staging, manifest: dict[str, Any]) -> str:
        old_manifest = join(self.prepared, MANIFEST)
        retired = join(self.versions, f".retired-{uuid.uuid4().hex[:8]}")
        if self.fs.exists(old_manifest):
            self.fs.delete(old_manifest, recursive=False)
        if self.fs.exists(self.prepared):
            self.fs.rename(self.prepared, retired)
        self.fs.rename(staging.url, self.prepared)
        self.fs.write_json(join(self.prepared, MANIFEST), manifest)
        for name, is_dir, _ in self.fs.list_dir(self.versions):
            if is_dir and (name.startswith(".retired-") or name.startswith(_STAGING_PREFIX)):
                with contextlib.suppress(Exception):
                    self.fs.delete(join(self.versions, name), recursive=True)
        LOG.info("published %s (renamed from %s)", self.prepared, staging.url)
        return self.prepared
