"""Every file-system access of the product: local paths, ``file:``, ``dbfs:/``, ``hdfs://``, ``s3a://``.

Two ways in, one set of URL rules:

* **Python's view** (the functions below): what training ranks, TensorFlow, scoring workers and the
  registry read and write. Local and mounted paths are plain files; other URLs go through pyarrow's
  file systems. TensorFlow cannot write every scheme (no S3 in TF 2.15), so what it writes is
  written locally first and then copied.
* **The driver's Hadoop view** (:class:`HadoopFS`): what the Spark stages (prepare, score) use for
  listings, renames and small files, so they see exactly what Spark sees, with Spark's credentials.

The one ``dbfs:`` rule: ``dbfs:/x`` is the Databricks FUSE mount ``/dbfs/x`` for Python (every node
mounts it), a Hadoop URL for Spark, and has no symbolic links, so a directory is published there by
renames, as on other remote file systems. Small JSON files are written whole and renamed into place,
so a reader never sees half a file. Directory publication is atomic where the file system allows
(symlink swap on local disks, rename on HDFS), otherwise a staged copy moved into place.

Long on purpose: one module is the only place that touches a file system, and the one publisher
(``publish_dir``) serves every versioned artifact, so both views and their URL rules stay together.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from downpour.fsutil import swap_symlink

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

_LOCAL_SCHEMES = ("", "file", "dbfs")


def scheme(url: str) -> str:
    """'hdfs://nn/x' -> 'hdfs'; a plain path (also a Windows-less absolute path) -> ''."""
    u = str(url)
    return urlparse(u).scheme.lower() if "://" in u or u.startswith(("dbfs:", "file:")) else ""


def is_local(url: str) -> bool:
    """Python reads and writes it as a file (``dbfs:`` through its FUSE mount)."""
    return scheme(url) in _LOCAL_SCHEMES


def is_file_url(url: str) -> bool:
    """A path on this machine's own file system, for Python and the JVM alike (no ``dbfs:``)."""
    return scheme(url) in ("", "file")


_FUSE_ROOTS = ("/dbfs/", "/Volumes/")  # Databricks' FUSE mounts (DBFS, Unity Catalog volumes): no symlinks


def has_symlinks(url: str) -> bool:
    """Whether a directory can be published at ``url`` by a symlink swap (not on Databricks' FUSE mounts,
    whether named ``dbfs:/x`` or ``/dbfs/x``)."""
    return is_file_url(url) and not (local_path(url) + "/").startswith(_FUSE_ROOTS)


def local_path(url: str) -> str:
    """The local filesystem path of a local URL (``dbfs:/x`` is the Databricks FUSE mount ``/dbfs/x``)."""
    url = str(url)
    s = scheme(url)
    if s == "":
        return os.path.abspath(os.path.expanduser(url))
    if s == "file":
        # the path as Hadoop writes it (``file:/a#b``, ``file:///a b``): everything after the scheme and
        # an optional ``//authority``, with no query or fragment split off (a ``#`` or ``?`` is part of a
        # file name) and nothing percent-decoded (Hadoop's ``Path.toString`` does not encode)
        rest = url[len("file:"):]
        if rest.startswith("//"):  # file://authority/path
            return "/" + rest[2:].partition("/")[2]
        return rest
    if s == "dbfs":
        return "/dbfs/" + url.split(":", 1)[1].lstrip("/")
    raise ValueError(f"{url}: not a local URL")


def reader_url(url: str) -> str:
    """The URL form petastorm wants: ``file:///abs`` for local paths, remote URLs unchanged."""
    return "file://" + local_path(url) if is_local(url) else str(url).rstrip("/")


def join(url: str, *parts: str) -> str:
    if is_local(url) and scheme(url) == "":
        return os.path.join(url, *parts)
    return posixpath.join(str(url).rstrip("/"), *parts)


def _arrow_fs(url: str) -> tuple[Any, str]:
    """(pyarrow FileSystem, path) for a remote URL; ``s3a://``/``s3n://`` are read as ``s3://``."""
    from pyarrow import fs as pafs

    s = scheme(url)
    if s in ("s3a", "s3n"):
        url = "s3://" + str(url).split("://", 1)[1]
    return pafs.FileSystem.from_uri(url)


def resolve(url: str) -> str:
    """Follow a local symlink (``prepared`` -> a versioned directory) once, so that a concurrent
    re-publication cannot change the data under a running job. Remote URLs are returned as is."""
    if is_local(url):
        real = os.path.realpath(local_path(url))
        return real
    return str(url).rstrip("/")


def exists(url: str) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))
    from pyarrow import fs as pafs

    fs, path = _arrow_fs(url)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def file_stamp(url: str) -> str:
    """A string that changes whenever the file at ``url`` is replaced (caches key on it)."""
    if is_local(url):
        st = os.stat(local_path(url))
        return f"{st.st_mtime_ns}-{st.st_size}-{st.st_ino}"
    from pyarrow import fs as pafs

    fs, path = _arrow_fs(url)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(url)
    return f"{info.mtime_ns}-{info.size}"


def read_text(url: str) -> str:
    if is_local(url):
        with open(local_path(url), encoding="utf-8") as f:
            return f.read()
    fs, path = _arrow_fs(url)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def read_json(url: str) -> Any:
    return json.loads(read_text(url))


def write_text_atomic(url: str, text: str) -> None:
    """Write a whole file under a temporary name, then rename it into place."""
    if is_local(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs, path = _arrow_fs(url)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode("utf-8"))
    fs.move(tmp, path)


def write_json_atomic(url: str, obj: Any) -> None:
    write_text_atomic(url, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def makedirs(url: str) -> None:
    if is_local(url):
        os.makedirs(local_path(url), exist_ok=True)
    else:
        fs, path = _arrow_fs(url)
        fs.create_dir(path, recursive=True)


def delete_dir(url: str) -> None:
    """Remove a directory tree if it exists."""
    if is_local(url):
        p = local_path(url)
        if os.path.islink(p):
            os.unlink(p)
        elif os.path.exists(p):
            shutil.rmtree(p, ignore_errors=True)
        return
    from pyarrow import fs as pafs

    fs, path = _arrow_fs(url)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def delete_file(url: str) -> None:
    """Remove one file if it exists."""
    if is_local(url):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(local_path(url))
        return
    from pyarrow import fs as pafs

    fs, path = _arrow_fs(url)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)


def listdir(url: str) -> list[str]:
    """Base names of the entries of a directory ([] when it does not exist)."""
    if is_local(url):
        p = local_path(url)
        return sorted(os.listdir(p)) if os.path.isdir(p) else []
    from pyarrow import fs as pafs

    fs, path = _arrow_fs(url)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    return sorted(posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(path)))


def upload_dir(local_dir: str, url: str) -> None:
    """Copy a local directory tree to ``url`` (which must not exist yet)."""
    if is_local(url):
        shutil.copytree(local_dir, local_path(url))
        return
    from pyarrow import fs as pafs

    fs, path = _arrow_fs(url)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def copy_dir(src: str, dst: str) -> None:
    """Copy the directory tree at ``src`` to ``dst`` (which must not exist yet), any two schemes."""
    if is_local(src) and is_local(dst):
        shutil.copytree(local_path(src), local_path(dst))
        return
    from pyarrow import fs as pafs

    sfs, spath = (pafs.LocalFileSystem(), local_path(src)) if is_local(src) else _arrow_fs(src)
    dfs, dpath = (pafs.LocalFileSystem(), local_path(dst)) if is_local(dst) else _arrow_fs(dst)
    dfs.create_dir(dpath, recursive=True)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)


def download_dir(url: str, local_dir: str) -> str:
    """A local copy of the directory at ``url`` (the directory itself when it is already local)."""
    if is_local(url):
        return local_path(url)
    from pyarrow import fs as pafs

    fs, path = _arrow_fs(url)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def move(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` on one filesystem (atomic on local disks and HDFS)."""
    if is_local(src):
        os.replace(local_path(src), local_path(dst))
        return
    fs, a = _arrow_fs(src)
    _, b = _arrow_fs(dst)
    fs.move(a, b)


def staging_dir(url: str) -> str:
    """A fresh directory next to ``url`` into which a new version of ``url`` is assembled before
    :func:`publish_dir` swaps it in (same filesystem, so publishing is a rename)."""
    name = posixpath.basename(str(url).rstrip("/"))
    if has_symlinks(url):
        parent = os.path.dirname(local_path(url))
        path = os.path.join(parent, f".{name}.versions", f".staging-{uuid.uuid4().hex[:12]}")
        os.makedirs(path)
        return path
    # a mounted path stays a path (dbfs: -> /dbfs/...): TensorFlow writes into it directly
    base = local_path(url) if is_local(url) else str(url).rstrip("/")
    staging = f"{base}.staging-{uuid.uuid4().hex[:12]}"
    makedirs(staging)
    return staging


class _PythonFS:
    """Python's view of a remote file system in the shape :class:`HadoopFS` has, for :func:`publish_dir`."""

    exists = staticmethod(exists)
    rename = staticmethod(move)

    @staticmethod
    def delete(url: str, recursive: bool = True) -> None:
        if recursive:
            delete_dir(url)
        else:
            delete_file(url)

    @staticmethod
    def write_json(url: str, obj: Any) -> None:
        write_json_atomic(url, obj)

    @staticmethod
    def names(url: str) -> list[str]:
        return listdir(url)


def publish_dir(staging: str, url: str, version: str, keep_previous: int = 1, *,
                versions: str | None = None, marker: tuple[str, Any] | None = None,
                hadoop: HadoopFS | None = None, drop_stale_staging: bool = False,
                symlinks: bool | None = None) -> str:
    """Make the staged tree appear at ``url`` in one step; returns where it now lives.

    The one publisher of the product: the prepared data (``prepared``, with its manifest as the
    ``marker``), the model, the report and the scoring history all go through it.

    Local: the staging directory is renamed to ``<versions>/<version>`` (default
    ``.<name>.versions`` beside ``url``) and ``url`` becomes a symlink to it, swapped with an atomic
    rename, so a reader resolves either the old or the new tree, never a mix; the version it replaced
    (readers may still hold it) and ``keep_previous - 1`` more are kept, older ones removed.
    Other file systems have no symlinks (``dbfs:`` included): the old tree is moved aside, the staged
    one moved in (two renames: atomic each on HDFS, copies on object stores) and the old one deleted;
    ``hadoop`` does it through Spark's view for data Spark wrote (``s3a://`` has no pyarrow file system).

    ``marker`` (file name, JSON) is written last: inside the staging tree before its rename locally,
    after the move remotely, where the old marker is deleted first, so a reader never sees a marker
    beside files it does not describe. ``drop_stale_staging`` also removes ``.staging-*`` leftovers of
    crashed builds in ``versions`` (only where one writer publishes at a time). ``symlinks`` overrides
    :func:`has_symlinks` (the caller already decided).
    """
    name = posixpath.basename(str(url).rstrip("/"))
    if has_symlinks(url) if symlinks is None else symlinks:
        target = local_path(url)
        parent = os.path.dirname(target)
        vdir = local_path(versions) if versions else os.path.join(parent, f".{name}.versions")
        if marker:
            write_json_atomic(join(staging, marker[0]), marker[1])
        dest = os.path.join(vdir, version)
        if os.path.exists(dest):
            dest = f"{dest}-{uuid.uuid4().hex[:6]}"
        os.replace(local_path(staging), dest)
        previous = os.path.realpath(target) if os.path.islink(target) else None
        swap_symlink(target, os.path.relpath(dest, parent), legacy_dir=vdir)
        _drop_old_versions(vdir, keep={dest, previous}, keep_previous=keep_previous,
                           stale_staging=drop_stale_staging)
        for e in os.listdir(parent):  # temporary links a crash left behind
            if e.startswith(f".{name}.tmp-"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(parent, e))
        return dest
    ops: Any = hadoop or _PythonFS
    url = str(url).rstrip("/")
    if marker and ops.exists(join(url, marker[0])):
        ops.delete(join(url, marker[0]), recursive=False)
    aside = join(versions, f".retired-{uuid.uuid4().hex[:8]}") if versions else f"{url}.old-{uuid.uuid4().hex[:8]}"
    had_old = ops.exists(url)
    if had_old:
        ops.rename(url, aside)
    ops.rename(staging, url)
    if marker:
        ops.write_json(join(url, marker[0]), marker[1])
    if had_old:
        ops.delete(aside, recursive=True)
    if versions and drop_stale_staging:
        for e in ops.names(versions):
            if e.startswith((".staging-", ".retired-")):
                with contextlib.suppress(Exception):
                    ops.delete(join(versions, e), recursive=True)
    return url


def _drop_old_versions(vdir: str, keep: set[str | None], keep_previous: int, stale_staging: bool) -> None:
    """Remove local versions beyond the current one, the one it replaced and ``keep_previous`` newest."""
    keep_real = {os.path.realpath(k) for k in keep if k}
    entries = [e for e in os.scandir(vdir) if e.is_dir(follow_symlinks=False)]
    staging = [e for e in entries if e.name.startswith(".staging-")]
    others = sorted((e for e in entries if not e.name.startswith(".staging-")
                     and os.path.realpath(e.path) not in keep_real),
                    key=lambda e: e.stat(follow_symlinks=False).st_mtime)
    kept_extra = max(0, keep_previous - (len(keep_real) - 1))
    doomed = others[: max(0, len(others) - kept_extra)] + (staging if stale_staging else [])
    for e in doomed:
        shutil.rmtree(e.path, ignore_errors=True)


# ---- the driver's Hadoop view -------------------------------------------------------------------
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

    def uri_key(self, url: str, encoded: bool = False) -> tuple[str, str, str]:
        """(scheme, authority, decoded path): the same file whether named by a URI-encoded URL
        (``encoded``: what ``input_file_name()`` gives) or a Hadoop path (what listings give)."""
        uri = self._jvm.java.net.URI(url) if encoded else self._p(url).toUri()
        return str(uri.getScheme()), str(uri.getAuthority() or ""), str(uri.getPath())

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

    def names(self, url: str) -> list[str]:
        return [name for name, _, _ in self.list_dir(url)]

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
        if is_file_url(url):
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
        if is_file_url(url):
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
