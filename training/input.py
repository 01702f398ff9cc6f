"""The training input pipeline: petastorm ``make_batch_reader`` -> vectorized shuffle -> ``tf.data``.

Per Horovod rank, petastorm reads the rank's row groups of a split (``cur_shard=rank``,
``shard_count=size``) as whole-row-group column batches (Arrow, converted to numpy without copies),
in a row-group order reshuffled on every pass. Rows are never unrolled one by one: a window of
``shuffle_window_row_groups`` row groups is shuffled with one permutation (each row group scattered
to its rows' new positions, one copy per column), cut into training batches and handed to ``tf.data`` a block of
batches at a time (``from_generator`` -> ``unbatch`` of [m, B] blocks into [B] batches). Rows that do
not fill a batch are carried into the next window.

Training reads an endless stream (``num_epochs=None``) and takes a fixed number of steps per epoch
computed from the manifest, so every rank runs the same number of steps however unevenly the row
groups split across ranks: no rank runs dry while the others wait in an allreduce. With
``epoch_steps`` set, the stream is cut into epochs that depend only on (seed, rank, epoch): epoch
``e`` starts a fresh pass seeded for ``e`` and ends after exactly ``epoch_steps`` batches (the rest
of that pass is dropped), so a run resumed at epoch ``k`` reads what an uninterrupted run reads from
epoch ``k`` on without re-reading epochs ``0..k-1``. Negative downsampling and class weights are
applied here, vectorized, per row group.

With ``cache`` (``training.input_cache_mb``: the rank's share, bounded from the manifest, fits), the
rank's row groups are decoded by one petastorm pass and kept; every pass then replays them in the
order petastorm would have read them with that pass's seed (``piece_order``; its shard order is
checked against the reader when the share is loaded, its permutation by the tests), so replaying and
streaming feed the model the same data. Reopening petastorm and decoding every epoch cost more CPU
than the shuffle itself, and on a worker whose cores all run TensorFlow that CPU is taken from the
model.

Long: the shard reading plan per rank and the petastorm -> tf.data pipeline share their batch and
row-group arithmetic.
"""

from __future__ import annotations

import random
import re
import time
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from downpour import storage
from downpour.errors import DataContractError
from downpour.layout import PreparedLayout, RunLayout
from downpour.logs import LOG

SPLITS = ("train", "val", "test")
# petastorm 0.13 reads through pyarrow's legacy ParquetDataset, which warns on every reader it opens
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\.|$)")
_BLOCK_ROWS = 65536  # rows per generator yield: amortizes the Python -> tf.data hand-over


# ---- the prepared directory ------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitInfo:
    """One split as the manifest describes it."""

    name: str
    url: str
    rows: int
    positives: int
    row_groups: int
    files: int
    row_group_rows_max: int = 0  # rows of the largest row group (0: not recorded)

    @property
    def negatives(self) -> int:
        return self.rows - self.positives


@dataclass(frozen=True)
class PreparedData:
    """``prepared/`` resolved once (a symlink to a versioned directory is followed at open time)."""

    url: str
    manifest: dict[str, Any]
    feature_state: dict[str, Any]

    @property
    def data_version(self) -> str:
        return str(self.manifest.get("data_version", "unknown"))

    def split(self, name: str) -> SplitInfo:
        s = (self.manifest.get("splits") or {}).get(name)
        files = PreparedLayout(self.url)
        where = f"{files.manifest}: splits.{name}"
        if not isinstance(s, Mapping):
            raise DataContractError(f"{where} is missing")
        try:
            return SplitInfo(
                name=name,
                url=files.split(name),
                rows=int(s["rows"]),
                positives=int(s.get("positives", 0)),
                row_groups=int(s.get("row_groups", 0)),
                files=int(s.get("files", 0)),
                row_group_rows_max=int(s.get("row_group_rows_max", 0)),
            )
        except (KeyError, TypeError, ValueError):
            raise DataContractError(f"{where}: needs integer 'rows' (and 'positives', 'row_groups')") from None


def open_prepared(output_url: str) -> PreparedData:
    """Resolve ``<output.path>/prepared`` once and read its manifest and feature state."""
    link = RunLayout(output_url).prepared.root
    url = storage.resolve(link)
    files = PreparedLayout(url)
    manifest_url = files.manifest
    if not storage.exists(manifest_url):
        raise DataContractError(
            f"{manifest_url}: no prepared data (manifest.json is missing); run `downpour prepare` first"
        )
    manifest = _read_json(manifest_url)
    state = _read_json(files.feature_state)
    if url != link.rstrip("/"):
        LOG.info("prepared data: %s -> %s (data_version %s)", link, url, manifest.get("data_version"))
    return PreparedData(url=url, manifest=manifest, feature_state=state)


def _read_json(url: str) -> dict[str, Any]:
    try:
        obj = storage.read_json(url)
    except FileNotFoundError:
        raise DataContractError(f"{url}: file is missing; run `downpour prepare` first") from None
    except ValueError as exc:
        raise DataContractError(f"{url}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise DataContractError(f"{url}: expected a JSON object")
    return obj


# ---- what to read -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """The shard columns a model reads: ``n__*`` float32, ``c__*`` int64, label, optional weight."""

    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    label: str = "label"
    weight: str | None = None
    extra: tuple[str, ...] = ()  # passed through untouched (e.g. row_id, for checks)

    @classmethod
    def from_feature_state(cls, state: Mapping[str, Any], extra: Sequence[str] = ()) -> InputSpec:
        def names(key: str) -> list[str]:
            return [e if isinstance(e, str) else e["name"] for e in state.get(key) or []]

        numeric = names("numeric") + names("flags")
        categorical = names("categorical") + names("crosses")
        if not numeric and not categorical:
            raise DataContractError("feature_state.json: no numeric or categorical columns")
        return cls(tuple(numeric), tuple(categorical), str(state.get("label") or "label"),
                   state.get("weight") or None, tuple(extra))

    @property
    def features(self) -> tuple[str, ...]:
        return self.numeric + self.categorical

    @property
    def columns(self) -> list[str]:
        cols = [*self.numeric, *self.categorical, self.label]
        if self.weight:
            cols.append(self.weight)
        return cols + [c for c in self.extra if c not in cols]


@dataclass(frozen=True)
class ReadOptions:
    """How one rank reads one split."""

    batch_size: int
    rank: int = 0
    size: int = 1
    shard: bool = True               # False: every rank reads every row group (too few row groups)
    num_epochs: int | None = None    # passes over the shard; None: endless (training)
    shuffle: bool = True
    window_row_groups: int = 4
    seed: int = 42
    keep_negatives: float = 1.0      # negative downsampling: P(keep) of a label-0 row
    positive_weight: float = 1.0     # class weight of label-1 rows (negatives weigh 1)
    reader_workers: int = 2
    drop_remainder: bool = False
    block_rows: int = _BLOCK_ROWS
    extra_dtypes: dict[str, Any] = field(default_factory=dict)
    epoch_steps: int | None = None   # endless reads only: epochs of exactly this many batches (resumable)
    first_epoch: int = 0             # with epoch_steps: the epoch the stream starts at (0-based)
    cache: bool = False              # decode the rank's row groups once and replay them every pass
    row_groups: int = 0              # with cache: the split's row groups (the manifest's), for replay


def expected_train_rows(info: SplitInfo, keep_negatives: float) -> float:
    """Rows an epoch covers after negative downsampling (all positives, a fraction of negatives)."""
    return info.positives + keep_negatives * info.negatives


def share_bytes(info: SplitInfo, spec: InputSpec, rank: int, size: int, shard: bool) -> int:
    """At least the decoded bytes of the row groups rank ``rank`` of ``size`` reads from ``info``, from
    the manifest alone (the rank's row groups times the largest row group's rows, at 8 bytes for the
    label, weight and extra columns): what ``training.input_cache_mb`` is compared with before
    anything is read."""
    per_row = 4 * len(spec.numeric) + 8 * len(spec.categorical) + 8 * (2 + len(spec.extra))
    groups = max(1, info.row_groups)
    owned = len(range(rank, groups, size)) if shard and size > 1 else groups
    largest = info.row_group_rows_max or -(-info.rows // groups)
    return per_row * min(info.rows, owned * largest)


# ---- numpy: row groups -> shuffled blocks of batches ---------------------------------------------------
def _pass_seed(seed: int, rank: int, pass_index: int) -> int:
    # never 0: petastorm treats seed 0 as "unseeded"
    return (zlib.crc32(f"{seed}/{rank}/{pass_index}".encode()) & 0x7FFFFFFF) or 1


def iter_row_groups(url: str, spec: InputSpec, opts: ReadOptions) -> Iterator[dict[str, np.ndarray]]:
    """Whole row groups of this rank's shard as ``{column: numpy array}``, pass after pass.

    Each pass opens a petastorm batch reader with a pass-specific seed, so the row-group order is
    reshuffled on every pass; the row groups a rank owns do not change (petastorm assigns row group
    ``i`` to shard ``i % shard_count``).
    """
    passes = range(opts.num_epochs) if opts.num_epochs is not None else _count()
    for p in passes:
        reader = _open_reader(url, spec, opts, _seed_of_pass(opts, p), opts.reader_workers)
        try:
            if p == 0:
                _check_schema(url, spec, reader.schema)
            for batch in reader:
                yield batch._asdict()
        finally:
            reader.stop()
            reader.join()


def _seed_of_pass(opts: ReadOptions, p: int) -> int:
    # unsharded readers (too few row groups) get rank-specific orders so ranks do not march in step
    return _pass_seed(opts.seed, 0 if opts.shard else opts.rank, p)


def _open_reader(url: str, spec: InputSpec, opts: ReadOptions, seed: int, workers: int) -> Any:
    """One petastorm pass (``num_epochs=1``) over this rank's row groups, ordered by ``seed``."""
    from petastorm import make_batch_reader

    sharded = opts.shard and opts.size > 1
    try:
        reader = make_batch_reader(
            storage.reader_url(url),
            schema_fields=[re.escape(c) + "$" for c in spec.columns],
            reader_pool_type="thread",
            workers_count=workers,
            results_queue_size=max(2, opts.window_row_groups + workers),
            seed=seed,
            shuffle_rows=False,
            shuffle_row_groups=opts.shuffle,
            num_epochs=1,
            cur_shard=opts.rank if sharded else None,
            shard_count=opts.size if sharded else None,
            convert_early_to_numpy=False,
        )
    except Exception as exc:  # noqa: BLE001 - petastorm raises bare Exceptions/ValueErrors
        raise DataContractError(f"{url}: cannot open the shards ({exc.__class__.__name__}: {exc})") from exc
    _guard_end_of_pass(reader)
    _zero_copy_results(reader)
    return reader


def _guard_end_of_pass(reader: Any) -> None:
    """Close a race in petastorm's thread pool that silently drops row groups.

    ``ThreadPool.get_results`` decides that a pass is over when every worker has drained what it was
    given *and then* the ventilator reports completion. If the ventilator hands out its last items
    between those two checks (likely at the start of a pass over a few row groups), the reader ends
    the pass without them. Reading the ventilator's completion *first* makes the check sound: once
    the ventilator is complete every item has been counted, so "all workers done" means all read.
    """
    pool = getattr(reader, "_workers_pool", None)
    original = getattr(pool, "all_workers_done", None)
    if pool is None or original is None or not hasattr(pool, "_ventilator"):
        return

    def all_workers_done() -> bool:
        ventilator = pool._ventilator
        finished = ventilator is None or ventilator.completed()
        return finished and original()

    pool.all_workers_done = all_workers_done


class _ArrowToNumpy:
    """Results reader for a petastorm batch reader: Arrow row group -> ``{column: numpy array}``.

    petastorm's own converts every column through a pandas Series, a per-column, per-row-group cost
    on top of the Parquet decode; ``ChunkedArray.to_numpy`` is zero-copy for the null-free numeric
    columns shards hold.
    """

    batched_output = True

    def read_next(self, workers_pool: Any, schema: Any, ngram: Any) -> Any:
        from petastorm.workers_pool import EmptyResultError

        try:
            result = workers_pool.get_results()
        except EmptyResultError:
            raise StopIteration from None
        if isinstance(result, dict):
            return schema.make_namedtuple(**result)
        return schema.make_namedtuple(**{name: result.column(name).to_numpy() for name in result.column_names})


def _zero_copy_results(reader: Any) -> None:
    if hasattr(reader, "_results_queue_reader"):
        reader._results_queue_reader = _ArrowToNumpy()


def _count() -> Iterator[int]:
    i = 0
    while True:
        yield i
        i += 1


@dataclass(frozen=True)
class Share:
    """A rank's row groups decoded once: petastorm's piece index -> ``{column: numpy array}``."""

    groups: dict[int, dict[str, np.ndarray]]


def piece_order(total: int, opts: ReadOptions, seed: int) -> list[int]:
    """The piece indices one petastorm 0.13 pass with ``seed`` reads, in its order: the shard filter
    (``Reader._partition_row_groups``: ``random.Random(seed)`` shuffles every index, then those with
    ``i % size == rank`` are kept), then the ventilator's ``np.random.default_rng(seed).permutation``
    when row groups are shuffled. ``load_share`` checks it against the reader it opens."""
    idx = list(range(total))
    if opts.shard and opts.size > 1:
        random.Random(seed).shuffle(idx)
        idx = [i for i in idx if i % opts.size == opts.rank]
    if opts.shuffle and idx:
        idx = [int(i) for i in np.random.default_rng(seed).permutation(idx)]
    return idx


def load_share(url: str, spec: InputSpec, opts: ReadOptions) -> Share | None:
    """This rank's row groups, decoded by one petastorm pass (one reader thread, so results come in
    the order the reader lists its pieces) and keyed by piece index, for ``replay``; None (stream
    instead, with a warning) when the reader's own piece list is not what ``piece_order`` predicts."""
    t0 = time.perf_counter()
    seed = _seed_of_pass(opts, 0)
    reader = _open_reader(url, spec, replace(opts, shuffle=False), seed, 1)
    try:
        _check_schema(url, spec, reader.schema)
        items = getattr(getattr(reader, "ventilator", None), "_items_to_ventilate", None) or []
        pieces = [int(item["piece_index"]) for item in items]
        if pieces != piece_order(opts.row_groups, replace(opts, shuffle=False), seed):
            LOG.warning("input: rank %d streams %s every epoch: petastorm's row-group order is not the one "
                        "replay reproduces (a petastorm other than 0.13, or a manifest that does not match "
                        "the shards)", opts.rank, url)
            return None
        groups = [batch._asdict() for batch in reader]
    finally:
        reader.stop()
        reader.join()
    if len(groups) != len(pieces):
        raise DataContractError(f"{url}: petastorm read {len(groups)} row groups of the {len(pieces)} listed")
    held = sum(v.nbytes for g in groups for v in g.values())
    LOG.info("input: rank %d holds its %d row group(s) of %s in memory (%.1f MiB, read in %.1fs)",
             opts.rank, len(groups), url, held / 2**20, time.perf_counter() - t0)
    return Share(dict(zip(pieces, groups, strict=True)))


def replay(share: Share, opts: ReadOptions) -> Iterator[dict[str, np.ndarray]]:
    """``iter_row_groups`` from memory: the same passes, each in the order petastorm would read with
    that pass's seed (``piece_order``), without reopening a reader or decoding Parquet."""
    passes = range(opts.num_epochs) if opts.num_epochs is not None else _count()
    for p in passes:
        for i in piece_order(opts.row_groups, opts, _seed_of_pass(opts, p)):
            yield share.groups[i]


def _share_for(url: str, spec: InputSpec, opts: ReadOptions) -> Share | None:
    """The replayable share when ``opts.cache`` asks for one (and a read has more than one pass)."""
    if not opts.cache or opts.num_epochs == 1:
        return None
    share = load_share(url, spec, opts)
    if share is not None and not share.groups:
        raise DataContractError(f"{url}: rank {opts.rank} of {opts.size} has no row group to read")
    return share


def _row_groups(url: str, spec: InputSpec, opts: ReadOptions, share: Share | None) -> Iterator[dict[str, np.ndarray]]:
    return replay(share, opts) if share is not None else iter_row_groups(url, spec, opts)


def _check_schema(url: str, spec: InputSpec, schema: Any) -> None:
    fields = schema.fields
    for col in spec.columns:
        if col not in fields:
            raise DataContractError(f"{url}: shard column {col!r} is missing (feature_state.json expects it)")
    for col in (*spec.numeric, spec.label, *([spec.weight] if spec.weight else [])):
        if np.dtype(fields[col].numpy_dtype).kind not in "fiub":
            raise DataContractError(f"{url}: column {col!r} must be float32, found {fields[col].numpy_dtype}")
    for col in spec.categorical:
        if np.dtype(fields[col].numpy_dtype).kind not in "iu":
            raise DataContractError(f"{url}: column {col!r} must be int64, found {fields[col].numpy_dtype}")


def _prepare_part(raw: dict[str, np.ndarray], spec: InputSpec, opts: ReadOptions,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One row group -> the kept rows (negative downsampling) as ``{key: 1-d array}`` with the model's
    dtypes, the label under ``label`` and the training weight under ``weight``."""
    label = np.asarray(raw[spec.label], dtype=np.float32)
    keep = None
    if opts.keep_negatives < 1.0:
        keep = (label > 0.5) | (rng.random(len(label)) < opts.keep_negatives)
        label = label[keep]

    def col(name: str, dtype: Any) -> np.ndarray:
        v = np.asarray(raw[name], dtype=dtype)
        return v[keep] if keep is not None else v

    part = {c: col(c, np.float32) for c in spec.numeric}
    part.update({c: col(c, np.int64) for c in spec.categorical})
    part.update({c: col(c, raw[c].dtype) for c in spec.extra})
    weight = col(spec.weight, np.float32).copy() if spec.weight else np.ones(len(label), np.float32)
    if opts.positive_weight != 1.0:
        weight[label > 0.5] *= np.float32(opts.positive_weight)
    part["label"] = label
    part["weight"] = weight
    return part


def iter_blocks(url: str, spec: InputSpec, opts: ReadOptions,
                row_groups: Iterator[dict[str, np.ndarray]] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of whole batches, ``{column: [m, B]}`` for every feature column plus ``label`` and
    ``weight`` (and extras). A finite read ends with one partial batch ``[1, r]`` unless
    ``drop_remainder``.

    A window of row groups is shuffled with one permutation (``_shuffled``: one copy per column);
    rows that do not fill a batch are carried into the next window, so no row is
    dropped before the final flush.
    """
    rng = np.random.default_rng([opts.seed, opts.rank, 0x5EED])
    b = opts.batch_size
    per_block = max(1, opts.block_rows // b)
    pending: list[dict[str, np.ndarray]] = []
    rows = groups = 0
    if row_groups is not None:
        source = row_groups
    else:
        source = _row_groups(url, spec, opts, _share_for(url, spec, opts))

    def emit(final: bool) -> Iterator[dict[str, np.ndarray]]:
        nonlocal pending, rows
        keys = pending[0].keys()
        n = rows
        if opts.shuffle and n > 1:
            data = _shuffled(pending, rng.permutation(n))
        else:
            data = {k: np.concatenate([p[k] for p in pending]) if len(pending) > 1 else pending[0][k] for k in keys}
        pending, rows = [], 0
        full = (n // b) * b
        for start in range(0, full, per_block * b):
            stop = min(full, start + per_block * b)
            m = (stop - start) // b
            yield {k: v[start:stop].reshape(m, b) for k, v in data.items()}
        if n > full:
            rest = {k: v[full:] for k, v in data.items()}
            if not final:
                pending, rows = [rest], n - full
            elif not opts.drop_remainder:
                yield {k: v[None, :] for k, v in rest.items()}

    for raw in source:
        part = _prepare_part(raw, spec, opts, rng)
        if len(part["label"]):
            pending.append(part)
            rows += len(part["label"])
        groups += 1
        if groups >= opts.window_row_groups and rows >= b:
            groups = 0
            yield from emit(final=False)
    if rows:
        yield from emit(final=True)


def _shuffled(parts: Sequence[dict[str, np.ndarray]], perm: np.ndarray) -> dict[str, np.ndarray]:
    """The parts concatenated and reordered by ``perm`` (row ``j`` of the result is row ``perm[j]`` of
    the concatenation) in one copy per column: each part is scattered to its rows' new positions,
    instead of concatenating and then gathering (two copies)."""
    if len(parts) == 1:
        return {k: np.take(v, perm, axis=0) for k, v in parts[0].items()}
    where = np.empty_like(perm)
    where[perm] = np.arange(len(perm), dtype=perm.dtype)
    out: dict[str, np.ndarray] = {}
    for k in parts[0]:
        col = np.empty(len(perm), dtype=np.result_type(*(part[k] for part in parts)))
        start = 0
        for part in parts:
            v = part[k]
            col[where[start:start + len(v)]] = v
            start += len(v)
        out[k] = col
    return out


def _epoch_seed(seed: int, epoch: int) -> int:
    return zlib.crc32(f"{seed}/epoch/{epoch}".encode()) & 0x7FFFFFFF


def iter_epoch_blocks(url: str, spec: InputSpec, opts: ReadOptions) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of an endless stream made of epochs of exactly ``opts.epoch_steps`` batches, from
    epoch ``opts.first_epoch`` on.

    Why: a continuous stream's position at an epoch boundary depends on every earlier epoch (carried
    rows, pass boundaries, random draws), so a resumed run could only reproduce it by re-reading them.
    Here each epoch is its own seeded stream (row-group orders, window shuffles and negative
    downsampling all derive from ``(seed, epoch)``), so epoch ``e`` is the same data whether the run
    started at 0 or resumed at ``e``.
    """
    if not opts.epoch_steps or opts.num_epochs is not None:
        raise ValueError("iter_epoch_blocks needs epoch_steps >= 1 and an endless read (num_epochs=None)")
    epoch = opts.first_epoch
    share = _share_for(url, spec, opts)  # decoded once, replayed every epoch
    while True:
        e_opts = replace(opts, seed=_epoch_seed(opts.seed, epoch), epoch_steps=None, first_epoch=0)
        source = _row_groups(url, spec, e_opts, share)
        blocks = iter_blocks(url, spec, e_opts, row_groups=source)
        left = opts.epoch_steps
        try:
            for block in blocks:
                m = len(block["label"])
                if m >= left:
                    yield {k: v[:left] for k, v in block.items()}
                    break
                yield block
                left -= m
        finally:
            blocks.close()
            source.close()  # stops this epoch's petastorm reader now, not when collected
        epoch += 1


def _blocks(url: str, spec: InputSpec, opts: ReadOptions) -> Iterator[dict[str, np.ndarray]]:
    return iter_epoch_blocks(url, spec, opts) if opts.epoch_steps else iter_blocks(url, spec, opts)


def iter_batches(url: str, spec: InputSpec, opts: ReadOptions) -> Iterator[dict[str, np.ndarray]]:
    """Single batches as ``{column: array [B]}`` (numpy; for checks and non-TF consumers)."""
    for block in _blocks(url, spec, opts):
        for i in range(len(block["label"])):
            yield {k: v[i] for k, v in block.items()}


# ---- tf.data ------------------------------------------------------------------------------------------
def make_dataset(url: str, spec: InputSpec, opts: ReadOptions, keras: bool = True) -> Any:
    """A prefetched ``tf.data.Dataset`` of batches, each column a [B] tensor: ``(features, label,
    weight)`` for Keras (``keras=True``), else one dict of every column plus ``weight``.

    The generator hands over blocks of ``block_rows // B`` batches; ``unbatch`` cuts them into
    batches inside tf.data, so Python runs once per block, not once per batch or row. With
    ``drop_remainder`` every batch has the static shape [B], so Keras traces its step for that
    shape, as it does for tensors held in memory.
    """
    import tensorflow as tf

    width = opts.batch_size if opts.drop_remainder else None  # static [B] batches, as tensors in memory have

    def spec_of(dtype: Any) -> Any:
        return tf.TensorSpec([None, width], dtype)

    features = {c: spec_of(tf.float32) for c in spec.numeric}
    features.update({c: spec_of(tf.int64) for c in spec.categorical})
    if keras:
        signature: Any = (features, spec_of(tf.float32), spec_of(tf.float32))

        def generate() -> Iterator[Any]:
            for block in _blocks(url, spec, opts):
                yield {c: block[c] for c in spec.features}, block["label"], block["weight"]
    else:
        signature = {**features, "label": spec_of(tf.float32), "weight": spec_of(tf.float32)}
        for c in spec.extra:
            signature[c] = spec_of(tf.as_dtype(opts.extra_dtypes.get(c, tf.string)))

        def generate() -> Iterator[Any]:
            yield from _blocks(url, spec, opts)

    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    ds = ds.unbatch()  # blocks [m, B] -> batches [B] (not rows: the batching was done in numpy)
    return ds.with_options(dataset_options()).prefetch(tf.data.AUTOTUNE)


def dataset_options() -> Any:
    """The ``tf.data.Options`` of every dataset ``make_dataset`` returns.

    Deterministic order. tf.data's model-based autotuning is off: the pipeline has no parallel stage
    for it to tune (the prefetch buffer tunes itself without it), and destroying an iterator waits
    for the autotuning thread, which made about one ``fit`` in three end 1.5 s late on the 2-core
    development VM (a native stack of the wait, ``RootDataset::Iterator`` destructor, is in
    benchmarks/README.md).
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False
    return options
