"""downpour/storage.py: the URL rules (one for ``dbfs:``) and both ways of publishing a directory."""

from __future__ import annotations

import os

import pytest

from downpour import storage


def test_dbfs_is_the_fuse_mount_for_python_and_has_no_symlinks():
    """On Databricks ``/dbfs`` is a FUSE mount without symbolic links: Python reads it as files, but a
    directory published there must be renamed into place, never swapped by a symlink."""
    assert storage.is_local("dbfs:/ml/model") and storage.local_path("dbfs:/ml/model") == "/dbfs/ml/model"
    assert not storage.is_file_url("dbfs:/ml/model") and not storage.has_symlinks("dbfs:/ml/model")
    for url in ("/tmp/x", "file:///tmp/x", "file:/tmp/x", "rel/x"):
        assert storage.is_file_url(url) and storage.has_symlinks(url), url
    for url in ("/dbfs/ml/model", "/Volumes/main/ml/model", "file:///dbfs/ml/model"):  # the same mounts
        assert storage.is_local(url) and not storage.has_symlinks(url), url
    for url in ("hdfs://nn/x", "s3a://b/x", "abfss://c@a.dfs.core.windows.net/x"):
        assert not storage.is_local(url) and not storage.has_symlinks(url), url


def test_a_hadoop_qualified_file_url_is_the_path_it_names_whatever_its_characters(spark, tmp_path):
    """Spark names a local output ``file:/dir/a#b c?d`` (Hadoop neither encodes nor splits it): the
    driver's Python must write where Spark wrote, not at ``/dir/a`` (a URL parser's path before ``#``)."""
    from downpour.storage import HadoopFS

    path = f"{tmp_path}/a#b c?d%20e/run"
    url = HadoopFS(spark).qualify(path)
    assert url.startswith("file:") and storage.local_path(url) == path
    for other in (f"file://{path}", f"file://localhost{path}"):
        assert storage.local_path(other) == path, other
    storage.write_json_atomic(storage.join(url, "x.json"), {"a": 1})
    assert os.path.exists(f"{path}/x.json") and not os.path.exists(f"{tmp_path}/a")
    spark.range(3).write.parquet(storage.join(url, "p"))
    assert storage.exists(storage.join(url, "p", "_SUCCESS"))


def _publish(url: str, content: str, version: str) -> str:
    staging = storage.staging_dir(url)
    storage.write_text_atomic(storage.join(staging, "data.txt"), content)
    return storage.publish_dir(staging, url, version)


def test_local_publication_swaps_a_symlink_and_keeps_one_previous_version(tmp_path):
    url = str(tmp_path / "model")
    for i in range(3):
        where = _publish(url, f"v{i}", f"v{i}")
        assert os.path.islink(url) and os.path.realpath(url) == os.path.realpath(where)
        assert storage.read_text(storage.join(url, "data.txt")) == f"v{i}"
    assert sorted(os.listdir(tmp_path / ".model.versions")) == ["v1", "v2"]


def test_publication_by_rename_where_there_are_no_symlinks(tmp_path, monkeypatch):
    """The path DBFS (and HDFS, object stores) take: a real directory renamed into place, no leftovers.
    Forced here on a local disk, which is what /dbfs looks like to Python."""
    monkeypatch.setattr(storage, "has_symlinks", lambda url: False)
    url = str(tmp_path / "model")
    for i in range(2):
        assert _publish(url, f"v{i}", f"v{i}") == url
        assert not os.path.islink(url) and storage.read_text(storage.join(url, "data.txt")) == f"v{i}"
    assert os.listdir(tmp_path) == ["model"]  # no staging, no moved-aside old tree, no versions folder


def test_file_stamp_changes_when_the_file_is_replaced(tmp_path):
    url = str(tmp_path / "saved_model.pb")
    storage.write_text_atomic(url, "a")
    first = storage.file_stamp(url)
    assert storage.file_stamp(url) == first
    storage.write_text_atomic(url, "bb")
    assert storage.file_stamp(url) != first
    with pytest.raises(OSError):
        storage.file_stamp(str(tmp_path / "missing.pb"))
