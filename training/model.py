"""Wide & deep network over the model-ready shard columns, built from ``feature_state.json``.

Deep part: one embedding table per categorical (``c__*``), concatenated with the numerics and flags
(``n__*``) and fed to a ReLU MLP. Wide part: a linear model over every feature (one weight per
categorical value and per cross value, one per numeric or flag), i.e. the logistic regression the
model is compared with. Head: deep logit + wide logit -> sigmoid, output ``score`` of shape [B, 1].

The model is a Keras 2 functional model whose four parts are named custom layers (``embeddings``,
``wide``, ``deep_tower``, ``head``) so that ``training.placement`` can put each on a device. Every
part opens ``tf.device`` both when it creates its variables (build) and when it computes (call), so
the variables really live where the map says and activations cross devices only between parts.
Embedding tables can be row-sharded across the worker's devices (``ShardedEmbedding``); a sharded
table computes exactly what the unsharded table computes, and its gradients stay IndexedSlices.

Initialisation is deterministic from ``training.seed`` and independent of the placement: a model
sharded k ways starts from the same weights as the unsharded model.

Long on purpose: the wide & deep model and its placement-aware layers (ShardedEmbedding) change
together.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from downpour.config import TrainingConfig
from downpour.errors import DataContractError
from downpour.training.placement import PartPlacement, resolve_placement

_PKG = "downpour"
_INIT_CHUNK_ROWS = 4096  # rows per deterministic init block; independent of the sharding
_EMB_INIT_SCALE = 0.05   # Keras' default uniform embedding initialiser range


def default_embedding_dim(cardinality: int) -> int:
    """The usual rule of thumb, min(50, round(1.6 * cardinality ** 0.56)), at least 1."""
    return max(1, min(50, round(1.6 * float(cardinality) ** 0.56)))


def shard_sizes(cardinality: int, num_shards: int) -> list[int]:
    """Rows of each block when ``cardinality`` rows are split into ``num_shards`` contiguous blocks:
    the first ``cardinality % num_shards`` blocks get one extra row (TF's 'div' strategy)."""
    k = max(1, min(num_shards, cardinality))
    base, extra = divmod(cardinality, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def _derive_seed(seed: int, *names: str) -> int:
    return zlib.crc32("/".join([str(seed), *names]).encode()) & 0x7FFFFFFF


def _as_list(x: Any) -> list[Any]:
    """Keras unwraps one-element input lists when it rebuilds a saved functional model."""
    if isinstance(x, (list, tuple)) and not isinstance(x, tf.TensorShape):
        return list(x)
    return [x]


@contextlib.contextmanager
def _on(device: str | None) -> Iterator[None]:
    if device:
        with tf.device(device):
            yield
    else:
        yield


# ---- layers ----------------------------------------------------------------------------------------
@tf.keras.utils.register_keras_serializable(package=_PKG)
class ShardedEmbedding(tf.keras.layers.Layer):
    """An embedding table split row-wise into contiguous blocks, block ``i`` on ``devices[i]``.

    A lookup routes each id to the block that owns it (``tf.dynamic_partition``), gathers on that
    block's device and puts the rows back in order (``tf.dynamic_stitch``); gradients reach only the
    rows used, as IndexedSlices. With one device (or none) it is a plain table. Ids outside
    ``[0, cardinality)`` are read as index 0, the out-of-vocabulary row.
    """

    def __init__(
        self,
        cardinality: int,
        output_dim: int,
        devices: Sequence[str] = (),
        initializer: str = "uniform",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if cardinality < 1 or output_dim < 1:
            raise ValueError(f"{self.name}: cardinality and output_dim must be >= 1")
        if initializer not in ("uniform", "zeros"):
            raise ValueError(f"{self.name}: initializer must be 'uniform' or 'zeros'")
        self.cardinality = int(cardinality)
        self.output_dim = int(output_dim)
        self.devices = tuple(devices)
        self.initializer = initializer
        self.seed = int(seed)
        self.sizes = shard_sizes(self.cardinality, max(1, len(self.devices)))
        self.offsets = [int(x) for x in np.cumsum([0, *self.sizes[:-1]])]
        self.shards: list[tf.Variable] = []

    @property
    def num_shards(self) -> int:
        return len(self.sizes)

    def shard_device(self, i: int) -> str | None:
        return self.devices[i] if self.devices else None

    def build(self, input_shape: Any) -> None:
        self.shards = []
        for i, (start, rows) in enumerate(zip(self.offsets, self.sizes, strict=True)):
            with _on(self.shard_device(i)):
                self.shards.append(
                    self.add_weight(
                        name=f"shard_{i}",
                        shape=(rows, self.output_dim),
                        dtype=tf.float32,
                        initializer=self._block_initializer(start, rows),
                        trainable=True,
                    )
                )
        super().build(input_shape)

    def _block_initializer(self, start: int, rows: int) -> Callable[..., tf.Tensor]:
        """Rows [start, start+rows) of the full table's initial value, generated in fixed chunks
        so every sharding of the same table starts from identical weights."""

        def init(shape: Any, dtype: Any = None, **_: Any) -> tf.Tensor:
            if self.initializer == "zeros":
                return tf.zeros(shape, dtype=dtype or tf.float32)
            end = start + rows
            blocks = []
            for c in range(start // _INIT_CHUNK_ROWS, (end - 1) // _INIT_CHUNK_ROWS + 1):
                rng = np.random.default_rng([self.seed, c])
                chunk = rng.uniform(-_EMB_INIT_SCALE, _EMB_INIT_SCALE, (_INIT_CHUNK_ROWS, self.output_dim))
                lo = max(start, c * _INIT_CHUNK_ROWS) - c * _INIT_CHUNK_ROWS
                hi = min(end, (c + 1) * _INIT_CHUNK_ROWS) - c * _INIT_CHUNK_ROWS
                blocks.append(chunk[lo:hi])
            return tf.constant(np.concatenate(blocks).astype(np.float32), dtype=dtype or tf.float32)

        return init

    def _route(self, ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(block index int32, row within the block) of each id, for contiguous 'div' blocks."""
        base, extra = divmod(self.cardinality, self.num_shards)
        threshold = extra * (base + 1)
        big = ids < threshold
        shard = tf.where(big, ids // (base + 1), extra + (ids - threshold) // base)
        row = tf.where(big, ids % (base + 1), (ids - threshold) % base)
        return tf.cast(shard, tf.int32), row

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        ids = tf.cast(ids, tf.int64)
        flat = tf.reshape(ids, [-1])
        flat = tf.where((flat < 0) | (flat >= self.cardinality), tf.zeros_like(flat), flat)
        if self.num_shards == 1:
            with _on(self.shard_device(0)):
                out = tf.gather(self.shards[0], flat)
        else:
            shard, row = self._route(flat)
            positions = tf.dynamic_partition(tf.range(tf.size(flat)), shard, self.num_shards)
            rows = tf.dynamic_partition(row, shard, self.num_shards)
            pieces = []
            for i in range(self.num_shards):
                with _on(self.shard_device(i)):
                    pieces.append(tf.gather(self.shards[i], rows[i]))
            with _on(self.shard_device(0)):
                out = tf.dynamic_stitch(positions, pieces)
        out = tf.reshape(out, tf.concat([tf.shape(ids), [self.output_dim]], axis=0))
        out.set_shape(ids.shape.concatenate([self.output_dim]))
        return out

    # -- full-table view (tests, checkpoint portability between shardings, export) --
    def full_table(self) -> np.ndarray:
        """The whole [cardinality, output_dim] table, shards concatenated in row order."""
        return np.concatenate([v.numpy() for v in self.shards], axis=0)

    def set_full_table(self, table: np.ndarray) -> None:
        """Load an unsharded table's weights, splitting its rows across the shards."""
        table = np.asarray(table, dtype=np.float32)
        if table.shape != (self.cardinality, self.output_dim):
            raise ValueError(
                f"{self.name}: table shape {table.shape} != {(self.cardinality, self.output_dim)}"
            )
        for v, start, rows in zip(self.shards, self.offsets, self.sizes, strict=True):
            v.assign(table[start : start + rows])

    def placement_summary(self) -> str:
        if self.num_shards == 1:
            return self.shard_device(0) or "default"
        return "+".join(f"{d}[{n}]" for d, n in zip(self.devices, self.sizes, strict=False))

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "cardinality": self.cardinality,
            "output_dim": self.output_dim,
            "devices": list(self.devices),
            "initializer": self.initializer,
            "seed": self.seed,
        }


class _TablesPart(tf.keras.layers.Layer):
    """A part made of one ShardedEmbedding per column (the ``embeddings`` and ``wide`` parts)."""

    table_dim: int | None = None
    table_init = "uniform"

    def __init__(
        self,
        columns: Sequence[Mapping[str, Any]],
        devices: Sequence[str] = (),
        sharded: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.columns = [dict(c) for c in columns]
        self.devices = tuple(devices)
        self.sharded = bool(sharded)
        self.seed = int(seed)
        table_devices = self.devices if self.sharded else self.devices[:1]
        self.tables = [
            ShardedEmbedding(
                c["cardinality"],
                self.table_dim or c["embedding_dim"],
                devices=table_devices,
                initializer=self.table_init,
                seed=_derive_seed(self.seed, self.name, c["name"]),
                name=c["name"],
            )
            for c in self.columns
        ]

    @property
    def home(self) -> str | None:
        return self.devices[0] if self.devices else None

    def build(self, input_shape: Any) -> None:
        for table, shape in zip(self.tables, _as_list(input_shape), strict=True):
            with tf.name_scope(table.name):
                table.build(shape)
        super().build(input_shape)

    def placement_summary(self) -> str:
        if not self.devices:
            return "default"
        if not self.sharded:
            return self.devices[0]
        return f"sharded over {','.join(self.devices)} ({len(self.tables)} tables)"

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "columns": [dict(c) for c in self.columns],
            "devices": list(self.devices),
            "sharded": self.sharded,
            "seed": self.seed,
        }


@tf.keras.utils.register_keras_serializable(package=_PKG)
class CategoricalEmbeddings(_TablesPart):
    """The ``embeddings`` part: each categorical's embedding, concatenated -> [B, sum(dims)]."""

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        looked_up = [table(x) for table, x in zip(self.tables, _as_list(inputs), strict=True)]
        with _on(self.home):
            return tf.concat(looked_up, axis=-1)


@tf.keras.utils.register_keras_serializable(package=_PKG)
class WideLinear(_TablesPart):
    """The ``wide`` part: a linear model over every feature -> [B, 1].

    One weight per value of each categorical and each cross (a 1-dim table) plus one weight per
    numeric or flag column, so the model can represent the logistic regression it is compared
    with and the deep part only has to add what a linear model misses. Starts at zero, as the
    linear part of wide & deep usually does; the bias lives in the head. Inputs: the tables' ids in
    ``columns`` order, then the ``dense`` columns' values.
    """

    table_dim = 1
    table_init = "zeros"

    def __init__(self, columns: Sequence[Mapping[str, Any]], dense: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(columns, **kwargs)
        self.dense = [str(d) for d in dense]
        self.kernel: tf.Variable | None = None

    def build(self, input_shape: Any) -> None:
        shapes = _as_list(input_shape)
        for table, shape in zip(self.tables, shapes[: len(self.tables)], strict=True):
            with tf.name_scope(table.name):
                table.build(shape)
        if self.dense:
            with _on(self.home):
                self.kernel = self.add_weight(name="dense_kernel", shape=(len(self.dense), 1), dtype=tf.float32,
                                              initializer="zeros", trainable=True)
        tf.keras.layers.Layer.build(self, input_shape)

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        inputs = _as_list(inputs)
        ids, values = inputs[: len(self.tables)], inputs[len(self.tables):]
        looked_up = [table(x) for table, x in zip(self.tables, ids, strict=True)]
        with _on(self.home):
            if values:
                x = tf.stack([tf.cast(tf.reshape(v, [-1]), tf.float32) for v in values], axis=-1)
                looked_up.append(tf.matmul(x, self.kernel))
            return tf.add_n(looked_up)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "dense": list(self.dense)}


@tf.keras.utils.register_keras_serializable(package=_PKG)
class DeepTower(tf.keras.layers.Layer):
    """The ``deep_tower`` part: concat(embeddings, numerics) -> [Dense(ReLU) -> Dropout] * n."""

    def __init__(
        self,
        hidden_units: Sequence[int],
        dropout: float = 0.0,
        device: str | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.hidden_units = [int(u) for u in hidden_units]
        self.dropout = float(dropout)
        self.device = device or None
        self.seed = int(seed)
        self.dense = [
            tf.keras.layers.Dense(
                u,
                activation="relu",
                kernel_initializer=tf.keras.initializers.GlorotUniform(
                    seed=_derive_seed(self.seed, self.name, f"hidden_{i}")
                ),
                name=f"hidden_{i}",
            )
            for i, u in enumerate(self.hidden_units)
        ]
        self.drop = [
            tf.keras.layers.Dropout(self.dropout, seed=_derive_seed(self.seed, self.name, f"dropout_{i}"))
            for i in range(len(self.hidden_units))
        ]

    def build(self, input_shape: Any) -> None:
        shapes = [tf.TensorShape(s) for s in _as_list(input_shape)]
        width = sum(int(s[-1]) if s.rank == 2 else 1 for s in shapes)
        with _on(self.device):
            for layer in self.dense:
                with tf.name_scope(layer.name):
                    layer.build((None, width))
                width = layer.units
        super().build(input_shape)

    def call(self, inputs: Sequence[tf.Tensor], training: bool | None = None) -> tf.Tensor:
        with _on(self.device):
            cols = [
                tf.cast(x if x.shape.rank == 2 else tf.expand_dims(x, -1), tf.float32) for x in _as_list(inputs)
            ]
            x = tf.concat(cols, axis=-1) if len(cols) > 1 else cols[0]
            for dense, drop in zip(self.dense, self.drop, strict=True):
                x = drop(dense(x), training=training)
            return x

    def placement_summary(self) -> str:
        return self.device or "default"

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "hidden_units": self.hidden_units,
            "dropout": self.dropout,
            "device": self.device,
            "seed": self.seed,
        }


@tf.keras.utils.register_keras_serializable(package=_PKG)
class Head(tf.keras.layers.Layer):
    """The ``head`` part: deep logit (Dense(1) over the tower's output) + wide logit -> [B, 1]."""

    def __init__(self, device: str | None = None, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.device = device or None
        self.seed = int(seed)
        self.logit = tf.keras.layers.Dense(
            1,
            kernel_initializer=tf.keras.initializers.GlorotUniform(seed=_derive_seed(self.seed, self.name)),
            name="deep_logit",
        )

    def build(self, input_shape: Any) -> None:
        with _on(self.device), tf.name_scope(self.logit.name):
            self.logit.build(tf.TensorShape(_as_list(input_shape)[0]))
        super().build(input_shape)

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        inputs = _as_list(inputs)
        with _on(self.device):
            logit = self.logit(inputs[0])
            for extra in inputs[1:]:
                logit = logit + extra
            return logit

    def placement_summary(self) -> str:
        return self.device or "default"

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "device": self.device, "seed": self.seed}


# ---- the model -------------------------------------------------------------------------------------
def _names(entries: Sequence[Any]) -> list[str]:
    return [e if isinstance(e, str) else e["name"] for e in entries]


def _tables(spec: Mapping[str, Any], key: str, with_dim: bool) -> list[dict[str, Any]]:
    out = []
    for i, entry in enumerate(spec.get(key) or []):
        where = f"feature_state.json: {key}[{i}]"
        try:
            name, card = str(entry["name"]), int(entry["cardinality"])
        except (KeyError, TypeError, ValueError):
            raise DataContractError(f"{where}: needs 'name' and an integer 'cardinality'") from None
        if card < 1:
            raise DataContractError(f"{where} ({name}): cardinality must be >= 1, got {card}")
        table = {"name": name, "cardinality": card}
        if with_dim:
            dim = entry.get("embedding_dim")
            if dim is not None and int(dim) < 1:
                raise DataContractError(f"{where} ({name}): embedding_dim must be >= 1, got {dim}")
            table["embedding_dim"] = int(dim) if dim is not None else default_embedding_dim(card)
        out.append(table)
    return out


def input_columns(feature_spec: Mapping[str, Any]) -> dict[str, tf.DType]:
    """The model's inputs, in order: shard column -> dtype (``n__*`` float32, ``c__*`` int64)."""
    cols: dict[str, tf.DType] = {}
    for name in _names(feature_spec.get("numeric") or []) + _names(feature_spec.get("flags") or []):
        cols[name] = tf.float32
    for name in _names(feature_spec.get("categorical") or []) + _names(feature_spec.get("crosses") or []):
        cols[name] = tf.int64
    return cols


def keras_internals_unconverted() -> bool:
    """Have AutoGraph leave Keras' own code alone whichever package ``tf.keras`` is; True if it does.

    TensorFlow lists ``keras`` among the packages AutoGraph never rewrites, but TF 2.16 (Databricks 15.4
    LTS ML, ``TF_USE_LEGACY_KERAS=1``) does not list ``tf_keras``, so AutoGraph rewrote some 120 of
    Keras' functions while the model was built and ``fit`` traced its step, and the first epoch took
    about 8 times longer (benchmarks/README.md, "Investigation: Keras 2 on TF 2.16"). With ``tf_keras``
    listed, the run trains to the same weights as without it. Called by ``build_model``, so before
    anything of ours is traced; a TensorFlow without that registry is left as it is.
    """
    try:
        from tensorflow.python.autograph.core import config
        from tensorflow.python.autograph.impl.conversion import is_allowlisted

        if is_allowlisted(tf.keras.Model.train_step):
            return True
        package = tf.keras.Model.train_step.__module__.split(".")[0]
        config.CONVERSION_RULES = (config.DoNotConvert(package), *config.CONVERSION_RULES)
    except (ImportError, AttributeError):
        return False
    return is_allowlisted(tf.keras.Model.train_step)


def build_model(
    feature_spec: Mapping[str, Any],
    tcfg: TrainingConfig,
    devices: list[str] | None = None,
) -> tf.keras.Model:
    """Build the (uncompiled) wide & deep model for ``feature_state.json``'s columns.

    ``devices`` names the worker's devices (``placement.worker_devices(tcfg.devices_per_worker)``);
    left out, it is discovered when ``tcfg.placement`` or ``tcfg.devices_per_worker > 1`` asks for
    placement, and otherwise every part is left to TensorFlow's default device (the plain
    data-parallel case, where Horovod pins one device per rank).
    """
    keras_internals_unconverted()
    categorical = _tables(feature_spec, "categorical", with_dim=True)
    crosses = _tables(feature_spec, "crosses", with_dim=False)
    dense_names = _names(feature_spec.get("numeric") or []) + _names(feature_spec.get("flags") or [])
    if not (dense_names or categorical):
        raise DataContractError("feature_state.json: no numeric, flag or categorical columns to train on")
    plan: dict[str, PartPlacement] = resolve_placement(tcfg.placement, tcfg.devices_per_worker, devices)

    inputs = {name: tf.keras.Input(shape=(), name=name, dtype=dt) for name, dt in input_columns(feature_spec).items()}
    deep_in: list[Any] = []
    if categorical:
        emb = CategoricalEmbeddings(
            categorical, plan["embeddings"].devices, plan["embeddings"].sharded, tcfg.seed, name="embeddings"
        )
        deep_in.append(emb([inputs[c["name"]] for c in categorical]))
    deep_in += [inputs[n] for n in dense_names]
    tower = DeepTower(tcfg.hidden_units, tcfg.dropout, plan["deep_tower"].home, tcfg.seed, name="deep_tower")
    head_in = [tower(deep_in)]
    linear = [{"name": c["name"], "cardinality": c["cardinality"]} for c in categorical] + crosses
    wide = WideLinear(linear, dense_names, devices=plan["wide"].devices, sharded=plan["wide"].sharded,
                      seed=tcfg.seed, name="wide")
    head_in.append(wide([inputs[c["name"]] for c in linear] + [inputs[n] for n in dense_names]))
    logit = Head(plan["head"].home, tcfg.seed, name="head")(head_in)
    score = tf.keras.layers.Activation("sigmoid", dtype="float32", name="score")(logit)
    return tf.keras.Model(inputs=inputs, outputs=score, name="wide_deep")


def transfer_weights(src: tf.keras.Model, dst: tf.keras.Model) -> None:
    """Copy weights between two models of the same feature spec and any placements (e.g. a model
    trained with sharded tables -> an unsharded one for export, or the reverse for tests)."""
    for part in ("embeddings", "wide", "deep_tower", "head"):
        try:
            s, d = src.get_layer(part), dst.get_layer(part)
        except ValueError:
            continue
        if isinstance(s, _TablesPart):
            for st, dt in zip(s.tables, d.tables, strict=True):
                dt.set_full_table(st.full_table())
            if isinstance(s, WideLinear) and s.kernel is not None:
                d.kernel.assign(s.kernel)
        else:
            d.set_weights(s.get_weights())


def logit_model(model: tf.keras.Model) -> tf.keras.Model:
    """The same model (shared weights) returning its logit [B, 1] instead of the sigmoid.

    The served score is computed from the logit (``training.export``): recovering the logit from the
    float32 probability needed a clip at 1e-7, which tied most rows of a rare-positive split."""
    return tf.keras.Model(inputs=model.input, outputs=model.get_layer("score").input, name=f"{model.name}_logit")

