"""The entity history a ``downpour score`` run computes its window features over (features/history.py).

Sources, unioned (an event counts once, and a history event with the id of a row to score is that row):

1. the model's own: ``<model>/entity_history``, copied from its data version by ``train`` (else the
   prepared data of the same data version, for models exported before the model carried it);
2. every ``--history URL``: raw rows in the input's format (e.g. yesterday's file), read, parsed and
   cleaned like the input; or a history dataset written by ``score --history-out``;
3. ``--history-store URL``: a history dataset that is read when it exists and rolled forward.

With ``--history-out`` (or a store) the run publishes the union of its history and its clean input rows,
trimmed to the window horizon, atomically (versioned directory + symlink swap, or rename), so that the
next scheduled run sees today's events.

A gap between the end of the history and the first row to score is logged and recorded in the summary;
beyond ``scoring.max_history_gap`` it stops the run before any scoring (exit 3). A model with window
features and no history at all is an error unless ``--no-history`` says that is intended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from downpour.artifact import ModelArtifact
from downpour.config import Config, parse_duration
from downpour.errors import ConfigError, DataContractError
from downpour.features import history as H
from downpour.layout import RunLayout, ScoringLayout
from downpour.logs import LOG, timed
from downpour.spark import Persisted


@dataclass
class ScoringHistory:
    """The history of one scoring run: the rows (lazy) and what the summary says about them."""

    frame: DataFrame | None = None
    end_us: int | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)
    disabled: bool = False

    @property
    def rows(self) -> int | None:
        """At most this many rows in ``frame`` (the sources' own counts; 0 without a history), or None."""
        counts = [s.get("rows") for s in self.sources]
        return None if any(n is None for n in counts) else sum(counts)

    def summary(self, input_start_us: int | None, input_end_us: int | None) -> dict[str, Any]:
        gap = gap_seconds(self.end_us, input_start_us)
        return {
            "used": self.frame is not None, "disabled": self.disabled, "sources": self.sources,
            "end": H.iso(self.end_us), "input_start": H.iso(input_start_us), "input_end": H.iso(input_end_us),
            "gap_seconds": gap, "gap": H.describe_gap(gap) if gap is not None and gap > 0 else None,
            "overlap_seconds": -gap if gap is not None and gap < 0 else None,
        }


def summary_url(output_url: str) -> str:
    """``<output>_summary.json``: counts, model version and the history of a scoring run."""
    return ScoringLayout(output_url).summary


def gap_seconds(end_us: int | None, start_us: int | None) -> float | None:
    """Seconds from the end of the history to the first row to score (negative: they overlap)."""
    if end_us is None or start_us is None:
        return None
    return (start_us - end_us) / 1_000_000


def check_flags(history: list[str], out: str | None, store: str | None, no_history: bool) -> None:
    """Before any work: contradictory flags, and never replace a directory that is not a history."""
    if no_history and (history or store):
        raise ConfigError("--no-history: cannot be combined with --history or --history-store")
    if out and store:
        raise ConfigError("--history-out: cannot be combined with --history-store (which is rolled forward "
                          "itself); pass the store as --history to read it and --history-out to write elsewhere")
    from downpour import storage

    for flag, url in (("--history-out", out), ("--history-store", store)):
        if url and storage.exists(url) and not H.is_history(url):
            raise ConfigError(f"{flag} {url}: it exists and is not an entity history (no {H.META}); "
                              "refusing to replace it")


def model_history_url(cfg: Config, model_root: str, card: dict[str, Any]) -> str | None:
    """The model's own entity history, or that of its data version's prepared data, or None."""
    from downpour import storage

    prepared = RunLayout(cfg.output.path).prepared
    candidates = [ModelArtifact(model_root).entity_history(card)]
    if storage.exists(prepared.manifest):
        man = storage.read_json(prepared.manifest)
        if man.get("data_version") == card.get("data_version") and man.get("entity_history"):
            candidates.append(prepared.entity_history)
    return next((c for c in candidates if H.is_history(c)), None)


def load(spark: SparkSession, stage: Persisted, cfg: Config, *, model_root: str, card: dict[str, Any],
         history: list[str], store: str | None, no_history: bool,
         tag_raw: Any) -> ScoringHistory:
    """Every history source of this run (lazy frames; only raw ``--history`` files cost a pass).

    ``tag_raw(url) -> (config, tagged rows)`` reads raw rows through the scoring input's own chain
    (passed in by ``pipelines.score``, which owns that chain)."""
    out = ScoringHistory(disabled=no_history)
    if not H.needed(cfg) or no_history:
        if no_history and H.needed(cfg):
            LOG.warning("score: --no-history: window features see only the rows of the input (every "
                        "entity's first row in it looks like its first event ever)")
        return out
    parts: list[DataFrame] = []
    ends: list[int] = []

    def add_dataset(url: str, kind: str) -> None:
        df, meta = H.read(spark, url, cfg)
        parts.append(df)
        if meta.end_us is not None:
            ends.append(int(meta.end_us))
        out.sources.append({"kind": kind, "url": cfg.scrub(url), "rows": meta.rows, "end": meta.end})

    own = model_history_url(cfg, model_root, card)
    if own:
        add_dataset(own, "model")
    for url in history:
        if H.is_history(url):
            add_dataset(url, "history dataset")
            continue
        with timed(f"score: reading history rows {cfg.scrub(url)}"):
            events, end, n_ok, n_rejected = raw_events(cfg, url, tag_raw)
        # parsed once: the windows and the roll forward read it several times (the stage holds it)
        events = stage.persist(events)
        parts.append(events)
        if end is not None:
            ends.append(int(end))
        out.sources.append({"kind": "raw rows", "url": cfg.scrub(url), "rows": n_ok, "rejected": n_rejected,
                            "end": H.iso(end)})
        if n_rejected:
            LOG.warning("score: history %s: %d row(s) failed cleaning and are not used as history",
                        cfg.scrub(url), n_rejected)
    if store and H.is_history(store):
        add_dataset(store, "store")
    elif store:
        LOG.info("score: history store %s does not exist yet; this run creates it", cfg.scrub(store))
    if not parts:
        raise DataContractError(
            f"model {card.get('model_version')}: it uses window features and no entity history was found "
            f"(looked in {model_root}/entity_history and the prepared data of data version "
            f"{card.get('data_version')}); pass --history URL (e.g. the previous day's raw rows) or "
            "--no-history to score without one")
    out.frame = H.combine(parts)
    out.end_us = max(ends) if ends else None
    return out


def raw_events(cfg: Config, url: str, tag_raw: Any) -> tuple[DataFrame, int | None, int, int]:
    """(events, last event time, clean rows, rejected rows) of raw ``--history`` rows, in one pass."""
    from downpour.pipelines.ingest import REASON, contract_errors

    names = cfg.names
    full, tagged = tag_raw(url)
    with contract_errors(full):
        ok = F.col(REASON).isNull()
        t = F.when(ok, H.epoch_us(tagged, names[cfg.timestamp_column], "timestamp_column", url))
        row = tagged.agg(F.max(t).alias("end"), F.sum(ok.cast("int")).alias("ok"),
                         F.sum((~ok).cast("int")).alias("bad")).collect()[0]
    return H.events(tagged.where(ok), cfg), row["end"], int(row["ok"] or 0), int(row["bad"] or 0)


def check_gap(cfg: Config, hist: ScoringHistory, input_start_us: int | None, input_url: str) -> None:
    """Log the gap or overlap between history and input; stop (exit 3) beyond ``scoring.max_history_gap``."""
    gap = gap_seconds(hist.end_us, input_start_us)
    if gap is None:
        return
    if gap < 0:
        LOG.info("score: the input starts %s before the history ends (%s): rows in the overlap are scored "
                 "with a history trimmed to the window horizon", H.describe_gap(gap), H.iso(hist.end_us))
        return
    LOG.info("score: the input starts %s after the history ends (%s)", H.describe_gap(gap), H.iso(hist.end_us))
    limit = cfg.scoring.max_history_gap
    if limit is not None and gap > parse_duration(limit):
        raise DataContractError(
            f"input {cfg.scrub(input_url)}: it starts {H.describe_gap(gap)} after the entity history ends "
            f"({H.iso(hist.end_us)}), more than scoring.max_history_gap={limit}: window features would miss "
            "the events in between; pass the missing days with --history or raise the limit")


def roll_forward(stage: Persisted, cfg: Config, hist: ScoringHistory, clean_rows: DataFrame,
                 input_start_us: int | None, input_end_us: int | None, url: str) -> dict[str, Any]:
    """Publish history + the clean input rows, trimmed to the horizon, as the new version of ``url``.

    It also keeps what the input itself needed (the trim as of the input's first event), so scoring the
    same input again, e.g. a re-score with a new champion, sees the same history as this run did."""
    from downpour import storage

    new_events = H.events(clean_rows, cfg)
    # the input's version of an event wins over the history's (a corrected row replaces the old one)
    everything = H.with_context(new_events, hist.frame).drop(H.CONTEXT)
    everything = stage.persist(everything)
    end = max([e for e in (hist.end_us, input_end_us) if e is not None], default=None)
    kept = H.trim(everything, cfg, end) if end is not None else everything.limit(0)
    if input_start_us is not None and hist.frame is not None:
        as_of_input = H.trim(H.before(everything, cfg, input_start_us), cfg, input_start_us)
        kept = H.combine([kept, as_of_input])
    staging = storage.staging_dir(url)
    try:
        with timed(f"score: rolling the entity history forward to {cfg.scrub(url)}"):
            meta = H.write(kept, staging, cfg, end)
            where = storage.publish_dir(staging, url, f"history-{_stamp(end)}")
    except BaseException:
        storage.delete_dir(staging)
        raise
    LOG.info("score: entity history %s: %d events up to %s (%s)", cfg.scrub(url), meta.rows, meta.end, where)
    return {"url": cfg.scrub(url), "rows": meta.rows, "end": meta.end}


def _stamp(end_us: int | None) -> str:
    import uuid

    return f"{end_us or 0}-{uuid.uuid4().hex[:6]}"


def clean_events(ok: DataFrame, cfg: Config) -> DataFrame:
    """The scoring input's clean rows with their history identity (``HID``)."""
    return ok.withColumn(H.HID, H.identity(ok, cfg))


def input_time_columns(cfg: Config, tagged: DataFrame, ok: Any) -> list[Any]:
    """Aggregates (first, last event time of the clean rows) to add to scoring's outcome count."""
    names = cfg.names
    if not H.needed(cfg) or not cfg.timestamp_column:
        return []
    t = F.when(ok, H.epoch_us(tagged, names[cfg.timestamp_column], "timestamp_column", cfg.input.path))
    return [F.min(t).alias("t_min"), F.max(t).alias("t_max")]
