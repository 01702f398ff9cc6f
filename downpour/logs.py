"""Logging that says what happened and how long it took."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator

LOG = logging.getLogger("downpour")


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is *now* (notebooks and test capture swap it; a stale one is closed)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def setup_logging(level: str | int | None = None) -> None:
    level = level or os.environ.get("DOWNPOUR_LOG_LEVEL", "INFO")
    if not LOG.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        LOG.addHandler(handler)
    LOG.setLevel(level)
    LOG.propagate = False


@contextlib.contextmanager
def timed(what: str, logger: logging.Logger = LOG) -> Iterator[dict[str, float]]:
    """Log the start and the duration of a step; yields a dict that receives ``seconds``."""
    logger.info("%s ...", what)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - t0
        logger.info("%s done in %.1fs", what, out["seconds"])
