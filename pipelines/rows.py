"""The raw-rows chain, wired once: read -> parse -> clean policies [-> dedup -> derived -> split].

prepare builds its data version from it, evaluate rebuilds that version's rows from it (decision
costs, the champion's raw test rows), and score cleans new rows and raw ``--history`` rows with it, so
the three can never clean a row differently. Window features are added by each caller: prepare and
evaluate over the split rows, score over the entity history and the batch."""

from __future__ import annotations

from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from downpour.config import Config
from downpour.pipelines import clean
from downpour.pipelines.ingest import parse_columns, read_raw
from downpour.pipelines.split import assign_split
from downpour.storage import FileInfo


def without_label(cfg: Config) -> Config:
    """The config scoring rows are read with: no label column (one present in the input is ignored),
    and extra input columns allowed, as for a serving signature."""
    lab = cfg.label.column
    return cfg.model_copy(update={
        "input": cfg.input.model_copy(update={"allow_extra_columns": True}),
        "schema_": {k: v for k, v in cfg.schema_.items() if k != lab},
    })


def tagged_rows(spark: SparkSession, cfg: Config, files: list[FileInfo], salt: str | None) -> DataFrame:
    """Training rows: every input row once, parsed and tagged with its status (clean, quarantined with
    its reason, duplicate), lazily. Statistic imputations are deferred to :func:`split_rows`."""
    return clean.tag_rows(parse_columns(read_raw(spark, cfg, files), cfg, salt), cfg, None)


def scoring_rows(spark: SparkSession, cfg: Config, files: list[FileInfo], salt: str | None,
                 stats: dict[str, Any]) -> DataFrame:
    """Scoring rows (no label): parsed and cleaned with the model's imputation statistics, each with the
    reason it failed or none. The input and raw ``--history`` rows both come through here."""
    raw = read_raw(spark, without_label(cfg), files)
    # a placeholder label satisfies the label rules (never output): scoring rows have no label
    raw = raw.withColumn(cfg.names[cfg.label.column], F.lit(str(cfg.label.positive)))
    return clean.apply_policies(parse_columns(raw, cfg, salt), cfg, stats)


def split_rows(tagged: DataFrame, cfg: Config,
               stats: dict[str, Any] | None = None) -> tuple[DataFrame, dict[str, Any], dict[str, Any]]:
    """The clean rows with ``split``, statistic imputations filled: (frame, split info, statistics).

    The statistics are fitted on the train split's clean rows (one pass) unless given (the published
    data version's, when its rows are rebuilt), so val and test never inform them.
    """
    split_df, split_info = assign_split(clean.clean_frame(tagged, cfg), cfg)
    if stats is None:
        stats = clean.null_statistics(split_df.where(F.col("split") == "train"), cfg)
    return clean.fill_statistics(split_df, cfg, stats), split_info, stats
