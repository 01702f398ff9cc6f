"""URLs for training's inputs and outputs: local paths, ``file://``, ``dbfs:/``, ``hdfs://``, ``s3a://``.

Training reads shards through petastorm (which takes URLs) and writes checkpoints, TensorBoard logs
and the exported model under ``output.path``. TensorFlow itself cannot write every scheme (no S3 in
TF 2.15), so everything TF writes is first written to a local directory and then copied with
pyarrow's filesystems; small JSON files are written whole and renamed into place, so a reader never
sees half a file. On local disks directory publication is atomic (rename / symlink swap); on object
stores it is as atomic as the store allows (copy to a staging name, then move).
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import uuid
from typing import Any
from urllib.parse import urlparse

from downpour.fsutil import swap_symlink

_LOCAL_SCHEMES = ("", "file", "dbfs")


def scheme(url: str) -> str:
    """'hdfs://nn/x' -> 'hdfs'; a plain path (also a Windows-less absolute path) -> ''."""
    u = str(url)
    return urlparse(u).scheme.lower() if "://" in u or u.startswith(("dbfs:", "file:")) else ""


def is_local(url: str) -> bool:
    return scheme(url) in _LOCAL_SCHEMES


def local_path(url: str) -> str:
    """The local filesystem path of a local URL (``dbfs:/x`` is the Databricks FUSE mount ``/dbfs/x``)."""
    url = str(url)
    s = scheme(url)
    if s == "":
        return os.path.abspath(os.path.expanduser(url))
    if s == "file":
        return urlparse(url).path
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
    if is_local(url):
        parent = os.path.dirname(local_path(url))
        path = os.path.join(parent, f".{name}.versions", f".staging-{uuid.uuid4().hex[:12]}")
        os.makedirs(path)
        return path
    staging = f"{str(url).rstrip('/')}.staging-{uuid.uuid4().hex[:12]}"
    makedirs(staging)
    return staging


def publish_dir(staging: str, url: str, version: str, keep_previous: int = 1) -> str:
    """Make the staged tree appear at ``url`` in one step; returns where it now lives.

    Local: the staging directory is renamed to ``.<name>.versions/<version>`` and ``url`` becomes a
    symlink to it, swapped with an atomic rename, so a reader resolves either the old or the new
    tree, never a mix; versions beyond the new one and ``keep_previous`` older ones are removed.
    Other filesystems have no symlinks: the old tree is moved aside, the staged one moved in (two
    renames: atomic each on HDFS, copies on object stores) and the old one deleted.
    """
    if is_local(url):
        target = local_path(url)
        parent = os.path.dirname(target)
        versions = os.path.join(parent, f".{posixpath.basename(target)}.versions")
        dest = os.path.join(versions, version)
        if os.path.exists(dest):
            dest = f"{dest}-{uuid.uuid4().hex[:6]}"
        os.replace(local_path(staging), dest)
        swap_symlink(target, os.path.relpath(dest, parent), legacy_dir=versions)
        current = os.path.basename(dest)
        old = sorted(
            (e for e in os.listdir(versions) if e != current and not e.startswith(".staging-")),
            key=lambda e: os.path.getmtime(os.path.join(versions, e)),
        )
        for e in old[: max(0, len(old) - keep_previous)]:
            shutil.rmtree(os.path.join(versions, e), ignore_errors=True)
        return dest
    from pyarrow import fs as pafs

    fs, path = _arrow_fs(url)
    _, staged = _arrow_fs(staging)
    old = f"{path}.old-{uuid.uuid4().hex[:8]}"
    had_old = fs.get_file_info(path).type != pafs.FileType.NotFound
    if had_old:
        fs.move(path, old)
    fs.move(staged, path)
    if had_old:
        fs.delete_dir(old)
    return str(url).rstrip("/")
