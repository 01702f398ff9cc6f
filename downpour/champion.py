"""The registry's champion pointer, as every reader follows it: only inside the registry.

``champion.json`` names the champion's directory (``versions/<model_version>``) relative to the registry.
Scoring (pipelines/), the gate and publishing (training/) all follow it, so the rule lives here, below
both: the pointer must be a plain relative path (letters, digits, ``._-``; no ``..``, no scheme or host,
not absolute) that resolves, symlinks followed, inside the registry. Anything else is refused with a
DataContractError (exit 3) naming the file: a tampered pointer would otherwise make scoring and
publishing load any model. The registry itself (writing, promotion, the gate) is training/registry.py.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Mapping
from typing import Any

from downpour import storage
from downpour.errors import DataContractError
from downpour.layout import CHAMPION, RegistryLayout  # noqa: F401 - CHAMPION is part of this module's API

# What champion.json's "path" may look like: relative, "/"-separated plain names (what promote writes:
# versions/<model_version>). No scheme ("s3a:", "file:"), host ("//h"), absolute path, "~", "\\" or "%".
_POINTER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")


def _refuse(where: str, pointer: Any, why: str) -> DataContractError:
    return DataContractError(
        f"{where}: champion path {pointer!r} {why}; refusing to follow it (champion.json may have been "
        "tampered with: restore it from history.jsonl, or run `downpour evaluate --gate` again)")


def check_pointer(root: str | os.PathLike[str], pointer: Any, where: str) -> str:
    """The champion's ``path`` after checking that it stays inside the registry ``root`` (a local path or
    any storage URL); returns it normalized. DataContractError (exit 3, naming ``where``) otherwise.

    Why exit 3: the user's config and command are fine; a file the registry wrote no longer holds
    what the registry writes, just like input data that breaks its contract.
    """
    if isinstance(pointer, str) and ".." in re.split(r"[/\\]", pointer):
        raise _refuse(where, pointer, "climbs out of the registry ('..')")
    if not isinstance(pointer, str) or not _POINTER.fullmatch(pointer):
        raise _refuse(where, pointer, "is not a plain relative path inside the registry "
                                      "(absolute, another scheme or host, or odd characters)")
    root_s = os.fspath(root)
    if "://" not in root_s and not root_s.startswith("dbfs:"):  # local: symlinks must not escape either
        real_root = os.path.realpath(root_s)
        for target in (os.path.join(root_s, pointer), RegistryLayout(root_s).pointed(pointer).model):
            real = os.path.realpath(target)
            if os.path.commonpath([real_root, real]) != real_root or real == real_root:
                raise _refuse(where, pointer, f"resolves to {real}, outside the registry {real_root}")
    return posixpath.normpath(pointer)


def champion_model_url(registry_url: str, rec: Mapping[str, Any]) -> str:
    """``<registry>/<champion path>/model`` for a champion record read from ``registry_url`` (any storage
    URL), after :func:`check_pointer`: what ``downpour score --model <registry>`` must load."""
    where = RegistryLayout(registry_url).champion
    if not isinstance(rec, Mapping):
        raise DataContractError(f"{where}: not a champion record (a JSON object with model_version and path)")
    root = storage.local_path(registry_url) if storage.is_local(registry_url) else registry_url
    return RegistryLayout(registry_url).pointed(check_pointer(root, rec.get("path"), where)).model
