"""Model-parallel placement: which device each named part of the model lives on, and what it costs.

A worker (one Horovod rank, one Spark task) owns ``training.devices_per_worker`` devices. The
``training.placement`` map puts the model's named parts (``embeddings``, ``wide``, ``deep_tower``,
``head``) on one of them by index, or splits an embedding part's tables row-wise across all of them
(``sharded``: DistBelief's block partitioning). Data parallelism across workers (Horovod) and model
parallelism inside a worker compose: every rank builds the same placed model on its own devices.

Device discovery must run before TensorFlow initialises its devices (the first op, the first
``tf.config.list_logical_devices`` call, or the first variable): logical CPU devices can only be
configured once per process. ``worker_devices`` is therefore the first TensorFlow call a worker makes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import tensorflow as tf

from downpour.config import PLACEABLE_PARTS
from downpour.errors import ConfigError
from downpour.logs import LOG

SHARDED = "sharded"
#: Parts whose variables are embedding tables and may therefore be row-sharded.
SHARDABLE_PARTS = ("embeddings", "wide")


@dataclass(frozen=True)
class PartPlacement:
    """Where one part lives: ``devices`` is empty for TF's default placement, one device when placed,
    and every worker device when the part's tables are row-sharded."""

    devices: tuple[str, ...] = ()
    sharded: bool = False

    @property
    def home(self) -> str | None:
        """The device that runs the part's dense compute (the first one; None = TF's choice)."""
        return self.devices[0] if self.devices else None


def worker_devices(k: int) -> list[str]:
    """The ``k`` devices one worker places its model on: ``/GPU:0..k-1`` when at least one GPU is
    visible, else ``k`` logical CPU devices carved out of the physical CPU.

    Call this before anything else touches TensorFlow in the process: logical devices can be
    configured only before TF initialises its runtime. If it already has, this still succeeds when
    the existing logical devices suffice and raises RuntimeError otherwise (run the work in a fresh
    process, e.g. a Horovod/Spark worker, which calls this first).
    """
    if k < 1:
        raise ConfigError(f"training.devices_per_worker: must be >= 1, got {k}")
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if len(gpus) < k:
            raise ConfigError(
                f"training.devices_per_worker: {k} devices per worker requested but this task sees "
                f"{len(gpus)} GPU(s); give each Spark task k GPUs (spark.task.resource.gpu.amount={k})"
            )
        return [f"/GPU:{i}" for i in range(k)]
    if k > 1:
        _ensure_logical_cpus(k)
    return [f"/CPU:{i}" for i in range(k)]


def _ensure_logical_cpus(k: int) -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) >= k:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * k)
        LOG.info("placement: split the CPU into %d logical devices", k)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have >= k:
            return
        raise RuntimeError(
            f"placement: {k} logical CPU devices are needed but TensorFlow is already initialised with "
            f"{have}; call training.placement.worker_devices({k}) before any other TensorFlow call in "
            "this process (or run in a fresh process)"
        ) from None


def resolve_placement(
    placement: Mapping[str, str | int],
    devices_per_worker: int,
    devices: Sequence[str] | None,
) -> dict[str, PartPlacement]:
    """Map every placeable part to its devices. Unmapped parts go to device 0; with no devices at all
    (one device per worker, empty map) every part is left to TensorFlow's default placement."""
    for part, dev in placement.items():
        key = f"training.placement.{part}"
        if part not in PLACEABLE_PARTS:
            raise ConfigError(f"{key}: unknown model part (one of {PLACEABLE_PARTS})")
        if dev == SHARDED and part not in SHARDABLE_PARTS:
            raise ConfigError(f"{key}: only {SHARDABLE_PARTS} hold embedding tables that can be sharded")
        if isinstance(dev, str) and dev != SHARDED:
            raise ConfigError(f"{key}: expected a device index or 'sharded', got {dev!r}")
        if isinstance(dev, int) and not 0 <= dev < devices_per_worker:
            raise ConfigError(f"{key}: device {dev} out of range for devices_per_worker={devices_per_worker}")
    if devices is None:
        if not placement and devices_per_worker == 1:
            return {part: PartPlacement() for part in PLACEABLE_PARTS}
        devices = worker_devices(devices_per_worker)
    if len(devices) < devices_per_worker:
        raise ConfigError(
            f"training.devices_per_worker: {devices_per_worker} devices needed, only {len(devices)} given"
        )
    devs = tuple(canonical_device(d) for d in devices[:devices_per_worker])
    out: dict[str, PartPlacement] = {}
    for part in PLACEABLE_PARTS:
        dev = placement.get(part, 0)
        out[part] = PartPlacement(devs, True) if dev == SHARDED else PartPlacement((devs[int(dev)],))
    return out


def canonical_device(device: str) -> str:
    """'/job:localhost/replica:0/task:0/device:CPU:1' or '/device:cpu:1' -> '/CPU:1'."""
    if not device:
        return "unplaced"
    spec = tf.DeviceSpec.from_string(device)
    if spec.device_type is None:
        return device
    return f"/{spec.device_type.upper()}:{spec.device_index or 0}"


def parameter_bytes_by_device(model: tf.keras.Model) -> dict[str, int]:
    """Bytes of model parameters (trainable and not) held on each device: the model card's
    ``training.placement``. Optimizer slots are not parameters and are not counted."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for v in model.weights:
        if id(v) in seen:
            continue
        seen.add(id(v))
        dev = canonical_device(v.device)
        out[dev] = out.get(dev, 0) + int(v.shape.num_elements()) * v.dtype.size
    return dict(sorted(out.items()))


def describe(model: tf.keras.Model) -> str:
    """One log line: where each part lives (and how tables are split) and the bytes per device."""
    parts = []
    for part in PLACEABLE_PARTS:
        try:
            layer = model.get_layer(part)
        except ValueError:
            continue
        summary = getattr(layer, "placement_summary", None)
        parts.append(f"{part}->{summary() if summary else 'default'}")
    by_dev = ", ".join(f"{d} {_human(b)}" for d, b in parameter_bytes_by_device(model).items())
    return f"placement: {'; '.join(parts)} | parameters: {by_dev}"


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def embedding_tables(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    """Every (possibly sharded) embedding table in the model, deep and wide."""
    return [m for m in model.submodules if hasattr(m, "full_table") and hasattr(m, "cardinality")]


def sparse_as_dense(model: tf.keras.Model, batch_size: int, workers: int) -> bool:
    """Whether ``hvd.DistributedOptimizer(sparse_as_dense=...)`` should densify embedding gradients.

    A table's gradient is IndexedSlices (only the rows a batch used). Horovod averages it across
    ranks either by allgathering (indices, values) from every rank, which moves about
    ``workers * batch * (dim * 4 + 8)`` bytes per table, or, densified, by a ring allreduce of
    the whole ``cardinality * dim * 4`` bytes. Both give the same average; pick the cheaper. Small
    vocabularies (CRM codes) densify; large row-sharded tables, the reason to shard, stay sparse.
    """
    dense = gathered = 0
    for t in embedding_tables(model):
        dense += t.cardinality * t.output_dim * 4
        gathered += workers * batch_size * (t.output_dim * 4 + 8)
    return dense <= gathered
