"""The one atomic publish primitive on local file systems: swap a symlink onto a new target.

Both the prepared data (``prepared -> .versions/<v>``) and the exported model
(``model -> .model.versions/<v>``) are published this way, so a reader resolves either the old or
the new tree, never a mix, and a crash at any point leaves the link on the last complete version.
"""

from __future__ import annotations

import os
import uuid


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (a directory entry is only on disk once its dir is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_symlink(link: str, target: str, legacy_dir: str) -> None:
    """Atomically point ``link`` at ``target`` (a path relative to ``link``'s directory).

    A temporary symlink is ``os.replace``-d onto ``link`` (one rename(2)), then the directory is
    fsync-ed. A real directory at ``link`` (an older layout) is first moved into ``legacy_dir`` as
    ``legacy-<id>`` so nothing is deleted. Temporary links are named ``.<link name>.tmp-<id>``; a crash
    can leave one behind, which callers may remove.
    """
    parent, name = os.path.split(link)
    if os.path.isdir(link) and not os.path.islink(link):
        os.replace(link, os.path.join(legacy_dir, f"legacy-{uuid.uuid4().hex[:8]}"))
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(parent)
