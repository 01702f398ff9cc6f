"""One validated, typed configuration object that flows through every stage.

YAML in ``conf/`` -> ``${ENV}`` interpolation -> ``--set dotted.key=value`` overrides -> pydantic
validation. Every error names the offending key path, and nothing runs before validation passes.

Long on purpose: the whole schema, its cross-key checks and the override and interpolation rules are
one contract (the README's configuration table is generated from it), so they change together.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from downpour.columns import column_names
from downpour.errors import ConfigError

SPARK_TYPES = {
    "string", "int", "integer", "long", "bigint", "double", "float", "boolean", "timestamp", "date",
}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# ---- what may leave the process (model card, MLflow, logs) -----------------------------------------
REDACTED = "***redacted***"
# Keys of the free-form settings (``spark.conf``, ``input.options``) whose values are credentials:
# ``spark.hadoop.fs.s3a.secret.key``, ``fs.azure.account.key.<acct>...``, ``spark.ssl.keyPassword``,
# ``spark.authenticate.secret``, JDBC ``password``, ``spark.executorEnv.*`` (a process environment is
# where secrets travel, e.g. the PII salt). Redacting a harmless key too costs nothing.
SECRET_KEY = re.compile(
    r"secret|passw|pwd|token|credential|key|auth|private|signature|cert|salt"
    r"|(?:executorEnv|appMasterEnv|driverEnv|driverSecretKeyRef|executorSecretKeyRef)\.",
    re.IGNORECASE,
)
FREE_FORM_SECTIONS: tuple[tuple[str, ...], ...] = (("spark", "conf"), ("input", "options"))
# Environment values shorter than this are not scrubbed out of *other* values: "2", "csv" or "yes"
# are no credentials, and replacing every "2" would shred the record. The value's own key always
# shows its ``${VAR}`` template instead, whatever its length.
MIN_SECRET_CHARS = 4
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
_QUERY_PAIR = re.compile(r"(^|[&;])([^=&;]+)=([^&;]*)")
# Settings outside the data sections that still shape the prepared data, so they are part of
# ``Config.fingerprint``: pipelines/shards.py plans ``shards.min_row_groups_per_worker *
# training.workers`` row groups per split. tests/test_config.py checks that every ``cfg.*`` read
# in pipelines/shards.py is fingerprinted.
PREPARED_DATA_KEYS: tuple[str, ...] = ("training.workers",)
_NOT_DATA = frozenset({"training", "evaluation", "scoring", "spark", "tracking"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Strict):
    path: str
    format: Literal["csv", "json", "parquet"] = "csv"
    options: dict[str, Any] = Field(default_factory=dict)
    allow_extra_columns: bool = False


class LabelConfig(_Strict):
    column: str
    positive: Any = 1


class PiiConfig(_Strict):
    drop: list[str] = Field(default_factory=list)
    hash: list[str] = Field(default_factory=list)
    salt_env: str = "DOWNPOUR_PII_SALT"


class SplitConfig(_Strict):
    method: Literal["hash", "time"] = "hash"
    key: str | None = None
    column: str | None = None
    fractions: dict[Literal["train", "val", "test"], float] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1}
    )
    boundaries: dict[Literal["val", "test"], str] | None = None
    seed: int = 42

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != {"train", "val", "test"}:
            raise ValueError("needs exactly train, val and test")
        if any(f < 0 or f > 1 for f in v.values()):
            raise ValueError("each fraction must be within [0, 1]")
        if v["train"] <= 0:
            raise ValueError("train fraction must be > 0")
        if abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1, got {sum(v.values()):.6g}")
        return v


class NullPolicy(_Strict):
    """What to do with a null in one column: reject the row, impute, or keep it (features flag it)."""

    action: Literal["reject", "impute", "keep"] = "keep"
    value: Any = None
    statistic: Literal["mean", "median", "mode"] | None = None
    flag: bool = False

    @model_validator(mode="after")
    def _impute_needs_value(self) -> NullPolicy:
        if self.action == "impute" and self.value is None and self.statistic is None:
            raise ValueError("action 'impute' needs 'value' or 'statistic'")
        return self


class RangeRule(_Strict):
    min: float | str | None = None
    max: float | str | None = None


class CleaningConfig(_Strict):
    trim: bool = True
    lowercase_categoricals: bool = False
    blank_as_null: bool = True
    nulls: dict[str, NullPolicy] = Field(default_factory=dict)
    ranges: dict[str, RangeRule] = Field(default_factory=dict)
    domains: dict[str, list[Any]] = Field(default_factory=dict)
    dedup: bool = True


class NumericSpec(_Strict):
    column: str
    transform: Literal["standardize", "log1p", "none"] = "standardize"
    clip_quantiles: tuple[float, float] | None = (0.001, 0.999)
    missing_flag: bool = True

    @field_validator("clip_quantiles")
    @classmethod
    def _q(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (0 <= v[0] < v[1] <= 1):
            raise ValueError("must be two quantiles 0 <= low < high <= 1")
        return v


class CategoricalSpec(_Strict):
    column: str
    encoding: Literal["vocab", "hash"] = "vocab"
    top_k: int = Field(1000, ge=1)
    min_count: int = Field(1, ge=1)
    buckets: int = Field(1000, ge=2)
    embedding_dim: int | None = Field(None, ge=1)


class VelocityConfig(_Strict):
    """Fraud velocity features: per-entity counts/sums over trailing event-time windows."""

    enabled: bool = False
    entities: list[str] = Field(default_factory=list)
    amount_column: str | None = None
    windows: list[str] = Field(default_factory=lambda: ["1h", "24h", "7d"])
    device_column: str | None = None
    country_column: str | None = None
    # Skew (see DEVELOPERS.md "Window features and hot keys"): an entity with more rows than this has
    # its history split into time buckets of `hot_key_bucket` (default: the largest window).
    hot_key_rows: int | None = Field(2_000_000, ge=1)
    hot_key_bucket: str | None = None

    @field_validator("windows")
    @classmethod
    def _windows(cls, v: list[str]) -> list[str]:
        for w in v:
            parse_duration(w)
        return v

    @model_validator(mode="after")
    def _bucket(self) -> VelocityConfig:
        _check_hot_key_bucket(self.windows, self.hot_key_bucket)
        return self


class RfmConfig(_Strict):
    """CRM recency/frequency/monetary features over trailing windows per customer."""

    enabled: bool = False
    entity: str | None = None
    amount_column: str | None = None
    windows: list[str] = Field(default_factory=lambda: ["30d", "90d"])
    signup_column: str | None = None
    frequency_column: str | None = None  # e.g. sessions; frequency = its sum (else the row count)
    hot_key_rows: int | None = Field(2_000_000, ge=1)
    hot_key_bucket: str | None = None

    @field_validator("windows")
    @classmethod
    def _windows(cls, v: list[str]) -> list[str]:
        for w in v:
            parse_duration(w)
        return v

    @model_validator(mode="after")
    def _bucket(self) -> RfmConfig:
        _check_hot_key_bucket(self.windows, self.hot_key_bucket)
        return self


def _check_hot_key_bucket(windows: list[str], bucket: str | None) -> None:
    """Window features need >= 1 window, and hot-key time buckets at least as long as the largest."""
    if not windows:
        raise ValueError("windows: needs at least one window, e.g. [1h, 24h, 7d]")
    if bucket is not None:
        try:
            seconds = parse_duration(bucket)
        except ValueError as exc:
            raise ValueError(f"hot_key_bucket: {exc}") from None
        if seconds < max(parse_duration(w) for w in windows):
            raise ValueError("hot_key_bucket: must be at least as long as the largest window")


class FeaturesConfig(_Strict):
    numeric: list[str | NumericSpec] = Field(default_factory=list)
    categorical: list[str | CategoricalSpec] = Field(default_factory=list)
    timestamp: list[str] = Field(default_factory=list)
    crosses: list[list[str]] = Field(default_factory=list)
    weight_column: str | None = None
    cross_buckets: int = Field(10000, ge=2)  # a cross wider than this is hashed into this many buckets
    velocity: VelocityConfig = Field(default_factory=VelocityConfig)
    rfm: RfmConfig = Field(default_factory=RfmConfig)

    def numeric_specs(self) -> list[NumericSpec]:
        return [NumericSpec(column=n) if isinstance(n, str) else n for n in self.numeric]

    def categorical_specs(self) -> list[CategoricalSpec]:
        return [CategoricalSpec(column=c) if isinstance(c, str) else c for c in self.categorical]


class ShardsConfig(_Strict):
    row_group_rows: int = Field(65536, ge=16)
    min_row_groups_per_worker: int = Field(4, ge=1)
    compression: Literal["snappy", "zstd", "gzip", "none"] = "snappy"


BUDGET_KEYS = ("steps", "examples", "epochs")
DEFAULT_EPOCHS = 5


class TrainingConfig(_Strict):
    workers: int = Field(2, ge=1)
    # the budget: one of steps, examples or epochs (training/budget.py); none given: 5 epochs
    epochs: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)       # optimizer steps in total (each: batch_size rows per worker)
    examples: int | None = Field(None, ge=1)    # training examples in total, all workers together
    validation_every_steps: int | None = Field(None, ge=1)  # a round; None: budget/10, or one pass (epochs)
    batch_size: int = Field(1024, ge=1)
    learning_rate: float = Field(0.001, gt=0)
    learning_rate_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)  # None: one pass, at most a tenth of the budget
    devices_per_worker: int = Field(1, ge=1)
    placement: dict[str, str | int] = Field(default_factory=dict)
    hidden_units: list[int] = Field(default_factory=lambda: [128, 64])
    dropout: float = Field(0.1, ge=0, lt=1)
    imbalance: Literal["none", "class_weight", "downsample"] = "none"
    downsample_negatives: float = Field(1.0, gt=0, le=1)
    early_stopping_patience: int = Field(3, ge=0)
    early_stopping_metric: str = "val_auc"
    shuffle_window_row_groups: int = Field(4, ge=1)
    threads_per_worker: int | None = Field(None, ge=1)
    # gradient allreduces per step (training/rank.py distributed_optimizer): 1 averages every gradient in
    # one grouped allreduce (one negotiation a step); n > 1 up to n groups; sparse table gradients form
    # one more group; 0 is Horovod's default, one allreduce per gradient, fused as they become ready
    allreduce_groups: int = Field(1, ge=0)
    seed: int = 42
    timeout_s: int = Field(3600, ge=10)
    # --- training stage (training/train.py, training/input.py; see DEVELOPERS.md "Training") ---
    positive_weight: float | None = Field(None, gt=0)  # imbalance=class_weight; None: negatives/positives
    reader_workers: int = Field(2, ge=1)  # petastorm reader threads per worker
    # a worker whose share of the train shards decodes to at most this many MiB reads it once and replays
    # it from memory every epoch (reshuffled); 0: always stream from the shards
    input_cache_mb: int = Field(512, ge=0)
    deterministic: bool = False  # bit-reproducible runs for a seed: 1 reader thread, deterministic TF ops

    @model_validator(mode="before")
    @classmethod
    def _one_budget(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        said = [k for k in BUDGET_KEYS if data.get(k) is not None]
        if len(said) > 1:
            raise ValueError(f"give the budget once: {' and '.join('training.' + k for k in said)} are both set "
                             "(one of training.steps, training.examples, training.epochs)")
        return data if said else {**data, "epochs": DEFAULT_EPOCHS}

    @field_validator("early_stopping_metric")
    @classmethod
    def _es_metric(cls, v: str) -> str:
        allowed = [f"{p}{m}" for p in ("val_", "") for m in ("auc", "pr_auc", "loss")]
        if v not in allowed:
            raise ValueError(f"unknown metric {v!r} (one of {allowed})")
        return v


class GateConfig(_Strict):
    metric: Literal["roc_auc", "pr_auc"] = "roc_auc"
    tolerance: float = Field(0.005, ge=0)
    # also refuse a model whose test metric is below the LR baseline's by more than this; null: off
    vs_baseline: float | None = Field(None, ge=0)


class DecisionConfig(_Strict):
    """Scores into actions (training/decision.py): evaluate picks the threshold with the lowest cost on val;
    score writes ``decision`` (score >= threshold). Costs are in the user's currency, per row."""

    enabled: bool = False
    action_cost: float = Field(0.0, ge=0)  # every row acted on: a review, a call
    # on top of action_cost, when the row acted on is a negative (a good customer blocked)
    false_positive_cost: float = Field(0.0, ge=0)
    missed_cost: float = Field(1.0, ge=0)  # a positive not acted on (missed fraud, a churner not called)
    # per row instead of missed_cost: a numeric raw column (e.g. the amount at risk); rebuilds val and test once
    missed_cost_column: str | None = None
    max_action_rate: float | None = Field(None, gt=0, le=1)  # alert budget: at most this share of rows acted on


class EvaluationConfig(_Strict):
    registry: str | None = None
    gate: GateConfig = Field(default_factory=GateConfig)
    decision: DecisionConfig = Field(default_factory=DecisionConfig)
    baseline: bool = True
    precision_at_k: list[int] = Field(default_factory=lambda: [100, 1000])
    fpr_points: list[float] = Field(default_factory=lambda: [0.001, 0.01])
    score_batch_rows: int = Field(10000, ge=1)
    # the logistic-regression baseline is fitted on at most this many (sampled) train rows
    baseline_max_train_rows: int = Field(1_000_000, ge=100)
    baseline_max_iter: int = Field(100, ge=1)  # L-BFGS iterations of the baseline (one Spark job each)
    # a second baseline: gradient-boosted trees (Spark ML GBTClassifier) on a bounded train sample;
    # ``baseline: false`` turns off both
    gbt_baseline: bool = False
    gbt_max_train_rows: int = Field(200_000, ge=100)
    gbt_max_iter: int = Field(50, ge=1)  # trees (a few Spark jobs each)
    gbt_max_depth: int = Field(5, ge=1, le=30)
    # score buckets per unit of logit for the one-pass metrics (see training/metrics.py "Precision")
    metric_resolution: int = Field(10_000, ge=10, le=1_000_000)

    @model_validator(mode="after")
    def _baseline_for_the_gate(self) -> EvaluationConfig:
        if self.gate.vs_baseline is not None and not self.baseline:
            raise ValueError("gate.vs_baseline compares the model with the baseline: it needs baseline: true")
        return self


class DriftConfig(_Strict):
    """Drift of a scoring batch against the training data (features/drift.py), in ``<output>_summary.json``."""

    enabled: bool = True
    # PSI of a numeric feature or of the score above this flags drift (0.1: moderate, 0.25: major, by convention)
    psi_threshold: float = Field(0.2, gt=0)
    # share of a categorical column's values never seen in train above this flags drift
    unseen_threshold: float = Field(0.05, ge=0, le=1)


class ReasonCodesConfig(_Strict):
    """Reason codes while scoring (training/explain.py): the features that pushed each row's score up
    most, by integrated gradients against a typical train row. Off by default: it costs about
    ``steps`` forward and backward passes per row."""

    enabled: bool = False
    top_k: int = Field(3, ge=1, le=20)  # reasons per row: reason_1 .. reason_<top_k> (+ _contribution)
    steps: int = Field(16, ge=2, le=512)  # trapezoid steps along the path; more: closer to complete, slower


class ScoringConfig(_Strict):
    """``downpour score``: how much time may pass between the entity history and the rows to score,
    and when a batch has drifted from the training data."""

    # the gap between the end of the history and the first row to score beyond which scoring stops
    # (exit 3): window features over a gap see no events in it. null: any gap (it is still reported).
    max_history_gap: str | None = None
    drift: DriftConfig = Field(default_factory=DriftConfig)
    reason_codes: ReasonCodesConfig = Field(default_factory=ReasonCodesConfig)

    @field_validator("max_history_gap")
    @classmethod
    def _gap(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration(v)
        return v


class SparkConfig(_Strict):
    master: str | None = None
    app_name: str = "downpour"
    conf: dict[str, str | bool | int | float] = Field(default_factory=dict)  # Spark's keys, flat


class OutputConfig(_Strict):
    path: str


class TrackingConfig(_Strict):
    """MLflow tracking (downpour/tracking.py, extra ``downpour[mlflow]``); off while mlflow_uri is unset."""

    mlflow_uri: str | None = None  # file:///mlruns, http://mlflow:5000, databricks
    experiment: str | None = None  # default: downpour-<name>
    log_model: bool = True  # the SavedModel as run artifacts (model/saved_model)
    # with --gate: the logged model as a version of a registered model, alias champion (promoted) or
    # challenger (refused); needs log_model
    register_model: bool = True
    # default downpour-<name>; a workspace registry name, or a Unity Catalog one: catalog.schema.model
    registered_model: str | None = None

    @field_validator("registered_model")
    @classmethod
    def _registered_model(cls, v: str | None) -> str | None:
        if v is not None and not (_PLAIN_MODEL_NAME.fullmatch(v) or is_unity_catalog_name(v)):
            raise ValueError(f"{v!r} is neither a registry name (letters, digits, _ and -) nor a Unity Catalog "
                             "name of exactly three non-empty parts, catalog.schema.model")
        return v

    @model_validator(mode="after")
    def _register_needs_the_model(self) -> TrackingConfig:
        # only when both were said: by default, log_model: false simply leaves the registry alone too
        if {"register_model", "log_model"} <= self.model_fields_set and self.register_model and not self.log_model:
            raise _KeyError("tracking.register_model", "a registered version is the logged model: it needs "
                            "tracking.log_model: true (or set register_model: false)")
        return self


_MODEL_NAME_PART = r"[A-Za-z0-9_-]+"
_PLAIN_MODEL_NAME = re.compile(_MODEL_NAME_PART)
_UNITY_CATALOG_NAME = re.compile(rf"{_MODEL_NAME_PART}\.{_MODEL_NAME_PART}\.{_MODEL_NAME_PART}")


def is_unity_catalog_name(name: str) -> bool:
    """``catalog.schema.model``: exactly three non-empty dot-separated parts (a Unity Catalog model)."""
    return bool(_UNITY_CATALOG_NAME.fullmatch(name))


class Config(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    input: InputConfig
    schema_: dict[str, str] = Field(alias="schema")
    id_column: str | None = None
    timestamp_column: str | None = None
    label: LabelConfig
    pii: PiiConfig = Field(default_factory=PiiConfig)
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    spark: SparkConfig = Field(default_factory=SparkConfig)
    output: OutputConfig
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # Set by config_from_dict. Key path -> (the ``${VAR}`` template, the value it became) for every
    # value that came from interpolation; the environment values substituted (the secrets to hide).
    _templates: dict[tuple[str | int, ...], tuple[str, Any]] = PrivateAttr(default_factory=dict)
    _env_values: frozenset[str] = PrivateAttr(default_factory=frozenset)

    @property
    def names(self) -> dict[str, str]:
        """Raw declared column name -> the safe internal name every stage uses (``downpour/columns.py``)."""
        return column_names(self.schema_)

    @field_validator("schema_")
    @classmethod
    def _schema_types(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("must declare at least one column")
        for col, typ in v.items():
            base = typ.strip().lower()
            if base not in SPARK_TYPES and not re.fullmatch(r"decimal\(\d+,\s*\d+\)", base):
                raise ValueError(f"column {col!r}: unknown type {typ!r} (one of {sorted(SPARK_TYPES)})")
        return {k: t.strip().lower() for k, t in v.items()}

    @model_validator(mode="after")
    def _columns_exist(self) -> Config:
        cols = set(self.schema_)
        refs: list[tuple[str, str | None]] = [
            ("label.column", self.label.column),
            ("id_column", self.id_column),
            ("timestamp_column", self.timestamp_column),
            ("split.key", self.split.key),
            ("split.column", self.split.column),
            ("features.weight_column", self.features.weight_column),
            ("features.velocity.amount_column", self.features.velocity.amount_column),
            ("features.velocity.device_column", self.features.velocity.device_column),
            ("features.velocity.country_column", self.features.velocity.country_column),
            ("features.rfm.entity", self.features.rfm.entity),
            ("features.rfm.amount_column", self.features.rfm.amount_column),
            ("features.rfm.signup_column", self.features.rfm.signup_column),
            ("features.rfm.frequency_column", self.features.rfm.frequency_column),
            ("evaluation.decision.missed_cost_column", self.evaluation.decision.missed_cost_column),
        ]
        refs += [(f"pii.drop[{i}]", c) for i, c in enumerate(self.pii.drop)]
        refs += [(f"pii.hash[{i}]", c) for i, c in enumerate(self.pii.hash)]
        refs += [(f"features.numeric[{i}]", s.column) for i, s in enumerate(self.features.numeric_specs())]
        refs += [
            (f"features.categorical[{i}]", s.column) for i, s in enumerate(self.features.categorical_specs())
        ]
        refs += [(f"features.timestamp[{i}]", c) for i, c in enumerate(self.features.timestamp)]
        refs += [(f"features.velocity.entities[{i}]", c) for i, c in enumerate(self.features.velocity.entities)]
        refs += [(f"cleaning.nulls.{c}", c) for c in self.cleaning.nulls]
        refs += [(f"cleaning.ranges.{c}", c) for c in self.cleaning.ranges]
        refs += [(f"cleaning.domains.{c}", c) for c in self.cleaning.domains]
        for i, cross in enumerate(self.features.crosses):
            refs += [(f"features.crosses[{i}][{j}]", c) for j, c in enumerate(cross)]
        for path, col in refs:
            if col is not None and col not in cols:
                raise _KeyError(path, f"column {col!r} is not in the schema")
        feature_cols = {s.column for s in self.features.numeric_specs()} | {
            s.column for s in self.features.categorical_specs()
        } | set(self.features.timestamp)
        for c in self.pii.drop + self.pii.hash:
            if c in feature_cols:
                raise _KeyError("pii", f"PII column {c!r} cannot also be a model feature")
        if self.label.column in feature_cols:
            raise _KeyError("features", f"the label column {self.label.column!r} cannot be a feature")
        cost_col = self.evaluation.decision.missed_cost_column
        if cost_col is not None:
            key = "evaluation.decision.missed_cost_column"
            if cost_col in self.pii.drop + self.pii.hash:
                raise _KeyError(key, f"column {cost_col!r} is PII; a cost must come from a non-PII column")
            if self.schema_[cost_col].split("(")[0] not in ("double", "float", "int", "integer", "long", "bigint",
                                                              "short", "smallint", "decimal"):
                raise _KeyError(key, f"column {cost_col!r} is {self.schema_[cost_col]}; a cost must be numeric")
        if self.split.method == "time":
            if not (self.split.column or self.timestamp_column):
                raise _KeyError("split.column", "a time split needs split.column or timestamp_column")
        if (self.features.velocity.enabled or self.features.rfm.enabled) and not self.timestamp_column:
            raise _KeyError("timestamp_column", "window features need an event-time column")
        if self.features.velocity.enabled and not self.features.velocity.entities:
            raise _KeyError("features.velocity.entities", "velocity features need at least one entity column")
        if self.features.rfm.enabled and not self.features.rfm.entity:
            raise _KeyError("features.rfm.entity", "RFM features need an entity column")
        if not (self.features.numeric or self.features.categorical or self.features.timestamp
                or self.features.velocity.enabled or self.features.rfm.enabled):
            raise _KeyError("features", "no features configured")
        for part, dev in self.training.placement.items():
            if part not in PLACEABLE_PARTS:
                raise _KeyError(f"training.placement.{part}", f"unknown model part (one of {PLACEABLE_PARTS})")
            if isinstance(dev, int) and not 0 <= dev < self.training.devices_per_worker:
                raise _KeyError(
                    f"training.placement.{part}",
                    f"device {dev} out of range for devices_per_worker={self.training.devices_per_worker}",
                )
            if isinstance(dev, str) and dev != "sharded":
                raise _KeyError(f"training.placement.{part}", "expected a device index or 'sharded'")
            if dev == "sharded" and part not in ("embeddings", "wide"):
                raise _KeyError(f"training.placement.{part}", "only embeddings and wide can be 'sharded'")
        return self

    # ---- derived values -------------------------------------------------------------------------
    @property
    def split_key(self) -> str | None:
        """The entity whose rows must stay in one split (defaults to the id column)."""
        return self.split.key or self.id_column

    @property
    def split_time_column(self) -> str | None:
        return self.split.column or self.timestamp_column

    def fingerprint(self) -> str:
        """Hash of everything that changes the prepared data: the data sections plus the few other keys
        that shape it (``PREPARED_DATA_KEYS``: the shard layout follows the worker count), and no other
        training setting, so raising ``epochs`` or the learning rate keeps the prepared data."""
        relevant = self.model_dump(mode="json", by_alias=True, exclude=set(_NOT_DATA))
        relevant["_prepared_data_keys"] = {k: dotted_get(self, k) for k in PREPARED_DATA_KEYS}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def to_public_dict(self) -> dict[str, Any]:
        """The config as recorded in model cards and MLflow: every interpolated value as its ``${VAR}``
        template, credential keys of free-form settings redacted, and no substituted environment
        value or URL password anywhere (artifacts outlive, and travel further than, the environment)."""
        return public_view(self, self.model_dump(mode="json", by_alias=True))

    def scrub(self, obj: Any) -> Any:
        """``obj`` (text, or JSON-like data) without the environment values this config substituted and
        without URL passwords: for log lines, exception texts and artifacts derived from the config."""
        return _scrub(obj, _secrets_of(self))


PLACEABLE_PARTS = ("embeddings", "wide", "deep_tower", "head")


def dotted_get(obj: Any, dotted: str) -> Any:
    """``dotted_get(cfg, "training.workers")``: an attribute path of a config (or a dict path)."""
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


# ---- the public view ---------------------------------------------------------------------------------
def _secrets_of(cfg: Config) -> list[str]:
    """Substituted environment values long enough to be credentials, longest first (so that a secret
    containing another is replaced whole)."""
    return sorted((v for v in cfg._env_values if len(v) >= MIN_SECRET_CHARS), key=len, reverse=True)


def public_view(cfg: Config, dump: dict[str, Any]) -> dict[str, Any]:
    """``cfg.model_dump`` made safe to write anywhere (see :meth:`Config.to_public_dict`)."""
    out = json.loads(json.dumps(dump))
    for path, (template, loaded) in cfg._templates.items():
        # Only where the value is still the interpolated one (a model_copy may have replaced it).
        parent, last = _parent(out, path)
        if parent is not None and parent[last] == loaded:
            parent[last] = template
    for section in FREE_FORM_SECTIONS:
        parent, last = _parent(out, section)
        if parent is not None:
            parent[last] = _redact_keys(parent[last])
    return _scrub(out, _secrets_of(cfg))


def _parent(obj: Any, path: tuple[str | int, ...]) -> tuple[Any, str | int]:
    """(container, last key) of ``path`` in nested dicts/lists, or (None, last) where it is absent."""
    for part in path[:-1]:
        try:
            obj = obj[part]
        except (KeyError, IndexError, TypeError):
            return None, path[-1]
    last = path[-1]
    if isinstance(obj, dict) and last in obj:
        return obj, last
    if isinstance(obj, list) and isinstance(last, int) and 0 <= last < len(obj):
        return obj, last
    return None, last


def _redact_keys(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: REDACTED if SECRET_KEY.search(str(k)) and v is not None else _redact_keys(v)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact_keys(v) for v in obj]
    return obj


def _scrub(obj: Any, secrets: list[str]) -> Any:
    if isinstance(obj, dict):
        return {_scrub(str(k), secrets): _scrub(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_scrub(v, secrets) for v in obj]
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, REDACTED)
        return _URL.sub(lambda m: _redact_url(m.group(0)), obj)
    if isinstance(obj, int | float) and not isinstance(obj, bool) and any(s in str(obj) for s in secrets):
        return REDACTED
    return obj


def _redact_url(url: str) -> str:
    """``https://user:pass@host/x?token=t`` -> the password and credential-like query values redacted
    (a ``${VAR}`` template is kept: it names the variable, not its value)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, sep, password = userinfo.partition(":")
        if sep and not _ENV.fullmatch(password):
            netloc = f"{user}:{REDACTED}@{host}"
        elif not sep and not _ENV.fullmatch(user):  # a bare token as the user (https://<token>@host)
            netloc = f"{REDACTED}@{host}"

    def query_value(m: re.Match[str]) -> str:
        key, value = m.group(2), m.group(3)
        secret = (SECRET_KEY.search(key) or key.lower() == "sig") and not _ENV.fullmatch(value)
        return f"{m.group(1)}{key}={REDACTED if secret else value}"

    query = _QUERY_PAIR.sub(query_value, parts.query)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class _KeyError(ValueError):
    """A validation error that knows its key path (raised from model validators)."""

    def __init__(self, path: str, msg: str) -> None:
        super().__init__(f"{path}: {msg}")
        self.path = path
        self.msg = msg


_DURATION = re.compile(r"^(\d+)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """'1h' -> 3600 seconds. Used by window features."""
    m = _DURATION.match(str(text).strip())
    if not m:
        raise ValueError(f"bad duration {text!r}: expected e.g. 30m, 1h, 24h, 7d")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


# ---- loading ---------------------------------------------------------------------------------------
def interpolate_env(value: Any, path: str = "", used: dict[str, str] | None = None) -> Any:
    """Replace ${VAR} / ${VAR:-default} in every string; a missing variable names its key path.

    ``used`` (if given) receives every variable taken from the environment and its value."""
    if isinstance(value, dict):
        return {k: interpolate_env(v, f"{path}.{k}" if path else str(k), used) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate_env(v, f"{path}[{i}]", used) for i, v in enumerate(value)]
    if isinstance(value, str):
        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                if used is not None:
                    used[name] = os.environ[name]
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{path}: environment variable ${{{name}}} is not set")

        return _ENV.sub(repl, value)
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values are parsed as YAML (``--set a.b=[1,2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value is not valid YAML ({exc.__class__.__name__})") from None
        node = raw
        parts = key.split(".")
        if parts[:2] == ["spark", "conf"] and len(parts) > 3:
            parts = [*parts[:2], ".".join(parts[2:])]  # Spark's own keys are dotted: one key, not a tree
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a mapping")
            node = nxt
        node[parts[-1]] = value
        if parts[:-1] == ["training"] and parts[-1] in BUDGET_KEYS and value is not None:
            for other in BUDGET_KEYS:  # an override replaces the file's budget, whichever key it used
                if other != parts[-1] and node.get(other) is not None:
                    node[other] = None
    return raw


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in e["loc"]).replace(".[", "[")
        loc = loc.replace("schema_", "schema")
        ctx_err = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _KeyError):
            lines.append(f"{ctx_err.path}: {ctx_err.msg}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{loc or '<root>'}: {msg}")
    return "; ".join(lines)


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Config:
    """Load, interpolate, override and validate a config file. Raises ConfigError (exit code 2)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--conf: no such config file: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--conf {p}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--conf {p}: the top level must be a mapping of keys")
    return config_from_dict(raw, overrides, base_dir=p.parent)


def config_from_dict(
    raw: dict[str, Any], overrides: list[str] | None = None, base_dir: Path | None = None
) -> Config:
    template = apply_overrides(json.loads(json.dumps(raw, default=str)), overrides or [])
    used: dict[str, str] = {}
    raw = interpolate_env(template, used=used)  # builds new containers: ``template`` stays as written
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    dump = cfg.model_dump(mode="json", by_alias=True)
    templates: dict[tuple[str | int, ...], tuple[str, Any]] = {}
    for path, text in _templated(template):
        parent, last = _parent(dump, path)
        if parent is not None:
            templates[path] = (text, parent[last])
    cfg._templates = templates
    cfg._env_values = frozenset(used.values())
    return cfg


def _templated(obj: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """(key path, text) of every string holding a ``${VAR}`` reference."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _templated(v, (*path, str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _templated(v, (*path, i))
    elif isinstance(obj, str) and _ENV.search(obj):
        yield path, obj
