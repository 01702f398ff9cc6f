"""The training input pipeline over real petastorm readers and tf.data (no Spark, no Horovod)."""

from __future__ import annotations

import collections
import json
import math
import os

import numpy as np
import pytest

from benchmarks.synthetic import write_prepared
from downpour.errors import DataContractError
from downpour.training.export import logit_shift, served_score
from downpour.training.input import (
    InputSpec,
    ReadOptions,
    iter_batches,
    iter_row_groups,
    load_share,
    make_dataset,
    open_prepared,
    share_bytes,
)

# petastorm 0.13 warns about pyarrow's legacy dataset API on every reader it opens
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# train: 8 row groups of 200 rows in 2 files; val: 5 row groups in one file (200 x 4 + 100), uneven
# for 2 and 3 ranks; test: 1 row group
ROWS = {"train": 1600, "val": 900, "test": 200}
FILES = {"train": 2, "val": 1, "test": 1}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("prepared"))
    write_prepared(root, ROWS, row_group_rows=200, files=FILES, positive_rate=0.2, weight=True)
    return open_prepared(root)


def _spec(prepared):
    return InputSpec.from_feature_state(prepared.feature_state, extra=("row_id",))


def _ids(batches):
    out = collections.Counter()
    for b in batches:
        out.update(str(x) for x in b["row_id"])
    return out


def test_open_prepared_resolves_the_symlink_once(prepared, tmp_path):
    assert os.path.basename(prepared.url).startswith(".prepared-v")  # the versioned directory, not the link
    assert prepared.split("train").rows == ROWS["train"]
    assert prepared.split("val").row_groups == 5
    with pytest.raises(DataContractError, match="manifest.json"):
        open_prepared(str(tmp_path))


@pytest.mark.parametrize("size,cache", [(1, False), (2, False), (3, False), (1, True), (3, True)])
def test_every_row_exactly_once_per_epoch_across_rank_shards(prepared, size, cache):
    spec, info = _spec(prepared), prepared.split("val")  # 5 row groups: uneven for 2 and 3 ranks
    per_rank = []
    for rank in range(size):
        opts = ReadOptions(batch_size=64, rank=rank, size=size, num_epochs=2, window_row_groups=2, seed=3,
                           cache=cache, row_groups=info.row_groups)
        per_rank.append(_ids(iter_batches(info.url, spec, opts)))
    for ids in per_rank:
        assert set(ids.values()) == {2}  # each row of the rank's shard, once per epoch
    for a in range(size):
        for b in range(a + 1, size):
            assert not set(per_rank[a]) & set(per_rank[b])  # shards are disjoint
    assert sum(len(ids) for ids in per_rank) == ROWS["val"]  # and cover the split


def test_petastorm_end_of_pass_race_loses_no_row_group(prepared):
    # petastorm's thread pool can end a pass before its last row groups are read (see
    # training.input._guard_end_of_pass); over many short passes that dropped ~1 group in 7.
    spec, info = _spec(prepared), prepared.split("val")
    opts = ReadOptions(batch_size=64, rank=0, size=2, num_epochs=60, reader_workers=2)
    rows = sum(len(rg["label"]) for rg in iter_row_groups(info.url, spec, opts))
    assert rows == 60 * 500  # rank 0 owns row groups 0, 2 and 4: 200 + 200 + 100 rows per pass


def test_row_group_order_is_reshuffled_every_pass_and_seeded(prepared):
    spec, info = _spec(prepared), prepared.split("train")

    def orders(seed):
        opts = ReadOptions(batch_size=64, num_epochs=3, seed=seed, reader_workers=1)
        firsts = [str(rg["row_id"][0]) for rg in iter_row_groups(info.url, spec, opts)]
        return [firsts[i:i + 8] for i in range(0, 24, 8)]

    a = orders(11)
    assert all(sorted(p) == sorted(a[0]) for p in a)  # every pass reads every row group once
    assert len({tuple(p) for p in a}) > 1  # in a new order (8! orders: a repeat is ~0 likely)
    assert orders(11) == a  # and the same orders for the same seed


def test_window_shuffle_mixes_rows_of_several_row_groups(prepared):
    spec, info = _spec(prepared), prepared.split("train")
    opts = ReadOptions(batch_size=100, num_epochs=1, window_row_groups=4, seed=5, reader_workers=1)
    first = next(iter_batches(info.url, spec, opts))
    groups = {int(str(r)[1:]) // 200 for r in first["row_id"]}  # row ids are consecutive per row group
    assert len(groups) >= 3
    unshuffled = next(iter_batches(info.url, spec, ReadOptions(batch_size=100, num_epochs=1, shuffle=False,
                                                               reader_workers=1)))
    assert len({int(str(r)[1:]) // 200 for r in unshuffled["row_id"]}) == 1


def test_tf_dataset_batches_have_model_shapes_and_dtypes(prepared):
    import tensorflow as tf

    spec, info = _spec(prepared), prepared.split("train")
    ds = make_dataset(info.url, spec, ReadOptions(batch_size=96, num_epochs=1, seed=1))
    sizes = []
    for features, label, weight in ds:
        assert set(features) == set(spec.features)
        for name, t in features.items():
            assert t.shape.rank == 1
            assert t.dtype == (tf.float32 if name.startswith("n__") else tf.int64)
        assert label.dtype == tf.float32 and weight.dtype == tf.float32
        assert label.shape == weight.shape == features[spec.numeric[0]].shape
        sizes.append(int(label.shape[0]))
    assert sum(sizes) == ROWS["train"]  # one pass, nothing dropped
    assert set(sizes[:-1]) == {96} and 0 < sizes[-1] <= 96
    # endless training stream with whole batches only: more batches than one pass holds
    endless = make_dataset(info.url, spec, ReadOptions(batch_size=96, num_epochs=None, drop_remainder=True))
    # whole batches have a static shape (Keras traces its step for [96], not [None]); a finite read
    # keeps the batch dimension open for its last, partial batch
    assert endless.element_spec[1].shape == (96,) and ds.element_spec[1].shape.as_list() == [None]
    assert endless.options().autotune.enabled is False  # see dataset_options: no autotuning thread
    # the training path: epochs of exactly 3 steps, cut from blocks of 2 batches
    stepped = make_dataset(info.url, spec, ReadOptions(batch_size=96, num_epochs=None, drop_remainder=True,
                                                       epoch_steps=3, block_rows=192))
    assert stepped.element_spec[1].shape == (96,)
    assert [tuple(label.shape) for _, label, _ in stepped.take(7)] == [(96,)] * 7
    n = 0
    for _, label, _ in endless.take(40):
        assert label.shape == (96,)
        n += 1
    assert n == 40 > ROWS["train"] // 96


def test_tf_dataset_of_columns_round_trips_values(prepared):
    spec, info = _spec(prepared), prepared.split("test")
    ds = make_dataset(info.url, spec, ReadOptions(batch_size=64, num_epochs=1, shuffle=False, reader_workers=1,
                                                  extra_dtypes={"row_id": "string"}), keras=False)
    import pyarrow.parquet as pq

    table = pq.read_table(info.url).to_pandas().set_index("row_id")
    for batch in ds:
        ids = [x.decode() for x in batch["row_id"].numpy()]
        want = table.loc[ids]
        np.testing.assert_array_equal(batch["n__x1"].numpy(), want["n__x1"].to_numpy(np.float32))
        np.testing.assert_array_equal(batch["c__k0_x_k1"].numpy(), want["c__k0_x_k1"].to_numpy(np.int64))
        np.testing.assert_array_equal(batch["label"].numpy(), want["label"].to_numpy(np.float32))
        np.testing.assert_array_equal(batch["weight"].numpy(), want["weight"].to_numpy(np.float32))


def test_negative_downsampling_keeps_every_positive_and_a_fraction_of_negatives(prepared):
    spec, info = _spec(prepared), prepared.split("train")
    opts = ReadOptions(batch_size=64, num_epochs=1, keep_negatives=0.25, seed=9)
    batches = list(iter_batches(info.url, spec, opts))
    label = np.concatenate([b["label"] for b in batches])
    assert int(label.sum()) == info.positives  # all positives
    kept, n = int((label == 0).sum()), info.negatives
    assert abs(kept - 0.25 * n) < 5 * math.sqrt(n * 0.25 * 0.75)  # ~ Binomial(n, 0.25)


def test_class_weight_multiplies_positive_weights(prepared):
    spec, info = _spec(prepared), prepared.split("test")
    plain = list(iter_batches(info.url, spec, ReadOptions(batch_size=64, num_epochs=1, shuffle=False,
                                                          reader_workers=1)))
    weighted = list(iter_batches(info.url, spec, ReadOptions(batch_size=64, num_epochs=1, shuffle=False,
                                                             reader_workers=1, positive_weight=7.0)))
    w0 = np.concatenate([b["weight"] for b in plain])
    w1 = np.concatenate([b["weight"] for b in weighted])
    pos = np.concatenate([b["label"] for b in plain]) > 0.5
    assert pos.any() and (~pos).any()
    np.testing.assert_allclose(w1[pos], 7.0 * w0[pos], rtol=1e-6)  # the weight column times 7
    np.testing.assert_array_equal(w1[~pos], w0[~pos])


def test_every_rank_gets_the_plans_steps_from_its_own_uneven_shard(tmp_path):
    """What each of 2 ranks reads for training: the driver's plan gives one ``steps_per_epoch``; each
    rank's real input pipeline (its petastorm shard, read as ``training/rank.py`` reads it) must yield that
    many whole batches every epoch, from its own rows only, although the shards are uneven."""
    from downpour.config import load_config
    from downpour.training.plan import make_plan
    from downpour.training.rank import train_read_options

    root = str(tmp_path)
    # 5 row groups (200 x 4 + 100): rank 0 owns groups 0, 2, 4 (500 rows), rank 1 groups 1, 3 (400 rows)
    write_prepared(root, {"train": 900, "val": 200, "test": 100}, row_group_rows=200, files=1, seed=3)
    prepared = open_prepared(root)
    size, batch, epochs = 2, 64, 3
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "conf", "fraud.yaml"), [
        f"output.path={root}", f"training.workers={size}", f"training.batch_size={batch}", "training.imbalance=none"])
    plan = make_plan(cfg, prepared, fresh=True)  # what the driver hands every rank
    steps, info, t = plan.steps_per_epoch, prepared.split("train"), cfg.training
    assert info.row_groups >= size  # sharded: each rank reads only its row groups
    spec = InputSpec.from_feature_state(plan.feature_state, extra=("row_id",))

    shard_ids, pass_batches = [], []
    for rank in range(size):  # one plain pass over each rank's shard: the shards really are uneven
        batches = list(iter_batches(info.url, spec, ReadOptions(batch_size=batch, rank=rank, size=size,
                                                                num_epochs=1, shuffle=False, reader_workers=1)))
        pass_batches.append(len(batches))
        shard_ids.append(set(_ids(batches)))
    assert [len(ids) for ids in shard_ids] == [500, 400]
    assert pass_batches == [8, 7]  # a per-shard step count would differ between the ranks
    assert not shard_ids[0] & shard_ids[1] and len(shard_ids[0] | shard_ids[1]) == info.rows
    assert steps * batch * size >= info.rows  # one epoch of the plan covers the split

    for rank in range(size):
        # the rank's training stream, with the options training/rank.py gives make_dataset
        ds = make_dataset(info.url, spec, train_read_options(plan, t, rank, size, info, 0, t.reader_workers,
                                                             extra_dtypes={"row_id": "string"}), keras=False)
        sizes, seen = [], set()
        for b in ds.take(steps * epochs):  # what Keras pulls for `epochs` epochs of `steps` steps
            sizes.append(int(b["label"].shape[0]))
            seen.update(x.decode() for x in b["row_id"].numpy())
        assert sizes == [batch] * (steps * epochs), f"rank {rank}: {len(sizes)} batches, sizes {set(sizes)}"
        assert seen <= shard_ids[rank]  # only its own shard's rows


def _epochs(url, spec, opts, epochs, steps):
    """Row ids per epoch of an ``epoch_steps`` stream, ``epochs`` epochs from ``opts.first_epoch``."""
    stream = iter_batches(url, spec, opts)
    return [[str(x) for _ in range(steps) for x in next(stream)["row_id"]] for _ in range(epochs)]


@pytest.mark.parametrize("cache", [True, False])
def test_a_cached_share_is_read_once_then_replayed_reshuffled_every_epoch(tmp_path, cache):
    """With ``cache``, the rank's row groups are decoded once: the shards can vanish after the first
    epoch and the later epochs still come, each a fresh order of the same rows. Without it (the
    companion), every epoch reopens the shards, so the same deletion stops the stream."""
    import shutil

    root = str(tmp_path)
    write_prepared(root, {"train": 1600, "val": 100, "test": 100}, row_group_rows=200, files=2, seed=4)
    prepared = open_prepared(root)
    spec, info = _spec(prepared), prepared.split("train")
    steps = 12  # 12 x 128 of a 1,600-row pass: each epoch is a different draw of rows
    opts = ReadOptions(batch_size=128, num_epochs=None, epoch_steps=steps, drop_remainder=True, seed=6,
                       reader_workers=1, cache=cache, row_groups=info.row_groups)
    stream = iter_batches(info.url, spec, opts)
    first = [str(x) for _ in range(steps) for x in next(stream)["row_id"]]
    shutil.rmtree(info.url)
    if not cache:
        with pytest.raises(Exception):  # noqa: B017 - petastorm's own error for a missing dataset
            for _ in range(steps):
                next(stream)
        return
    later = [[str(x) for _ in range(steps) for x in next(stream)["row_id"]] for _ in range(3)]
    for epoch in [first, *later]:
        assert len(epoch) == len(set(epoch)) == steps * 128  # no row twice within an epoch
    assert len({tuple(e) for e in [first, *later]}) == 4  # a new order every epoch
    assert len(set(first).union(*later)) > steps * 128  # and not always the same rows


@pytest.mark.parametrize("size", [1, 2, 3])
def test_replaying_a_share_feeds_exactly_what_streaming_it_feeds(prepared, size):
    """Replay reproduces petastorm's row-group order for every pass seed (its shard shuffle and its
    ventilator's permutation), so the budget that picks one or the other never changes the data: the
    same row groups per pass, then the same epochs after window shuffles and negative downsampling."""
    from dataclasses import replace

    from downpour.training.input import load_share, replay

    spec, info = _spec(prepared), prepared.split("train")  # 8 row groups: uneven for 3 ranks
    for rank in range(size):
        base = ReadOptions(batch_size=64, rank=rank, size=size, num_epochs=4, seed=21, reader_workers=1,
                           row_groups=info.row_groups)
        share = load_share(info.url, spec, base)
        assert share is not None and len(share.groups) == len(range(rank, 8, size))
        firsts = [str(g["row_id"][0]) for g in replay(share, base)]
        assert firsts == [str(g["row_id"][0]) for g in iter_row_groups(info.url, spec, base)], (size, rank)
        epochs = replace(base, num_epochs=None, epoch_steps=5, drop_remainder=True, keep_negatives=0.5,
                         window_row_groups=2)
        assert (_epochs(info.url, spec, replace(epochs, cache=True), 3, 5)
                == _epochs(info.url, spec, epochs, 3, 5)), (size, rank)


@pytest.mark.parametrize("size", [1, 2])
def test_cached_epochs_are_seeded_and_a_resumed_stream_reads_what_an_uninterrupted_one_reads(prepared, size):
    from dataclasses import replace

    spec, info = _spec(prepared), prepared.split("train")
    opts = ReadOptions(batch_size=50, rank=size - 1, size=size, num_epochs=None, epoch_steps=8,
                       drop_remainder=True, seed=8, reader_workers=1, cache=True, row_groups=info.row_groups)
    full = _epochs(info.url, spec, opts, 4, 8)
    assert _epochs(info.url, spec, opts, 4, 8) == full  # seeded: the same on a second run
    assert _epochs(info.url, spec, replace(opts, first_epoch=2), 2, 8) == full[2:]


def test_a_share_whose_order_petastorm_does_not_confirm_is_streamed(prepared):
    from downpour.training.input import load_share

    spec, info = _spec(prepared), prepared.split("train")
    wrong = ReadOptions(batch_size=64, rank=0, size=2, seed=3, reader_workers=1, row_groups=info.row_groups + 2)
    assert load_share(info.url, spec, wrong) is None  # a manifest that does not match the shards


def test_share_bytes_bounds_what_the_cache_holds_and_decides_it(prepared, tmp_path):
    """The manifest estimate behind ``training.input_cache_mb``, against the bytes really held."""
    from downpour.config import load_config
    from downpour.training.plan import make_plan
    from downpour.training.rank import train_read_options

    uneven = str(tmp_path / "uneven")  # 500 + 500 + 100 rows: rank 1 of 2 owns a full group only
    write_prepared(uneven, {"train": 1100, "val": 100, "test": 100}, row_group_rows=500, files=1, seed=2)
    for data in (prepared, open_prepared(uneven)):
        spec, info = _spec(data), data.split("train")
        for rank, size in [(0, 1), (0, 2), (1, 2), (1, 3)]:
            share = load_share(info.url, spec, ReadOptions(batch_size=64, rank=rank, size=size,
                                                           row_groups=info.row_groups))
            held = sum(v.nbytes for g in share.groups.values() for v in g.values())
            estimate = share_bytes(info, spec, rank, size, shard=True)
            assert held <= estimate <= 2.5 * held, (info.rows, rank, size, held, estimate)
    spec, info = _spec(prepared), prepared.split("train")

    conf = os.path.join(os.path.dirname(__file__), "..", "conf", "fraud.yaml")
    for budget_mb, cached in [(512, True), (0, False)]:
        cfg = load_config(conf, [f"output.path={tmp_path}", f"training.input_cache_mb={budget_mb}",
                                 "training.workers=2"])
        plan = make_plan(cfg, prepared, fresh=True)
        assert train_read_options(plan, cfg.training, 0, 2, info, 0, 1).cache is cached


def test_window_shuffle_scatters_to_the_same_rows_as_concatenate_then_take():
    from downpour.training.input import _shuffled

    rng = np.random.default_rng(1)
    parts = [{"a": rng.random(n).astype(np.float32), "b": rng.integers(0, 9, n),
              "s": np.array([f"r{i}" for i in range(n)], object)} for n in (5, 1, 7)]
    perm = rng.permutation(13)
    got = _shuffled(parts, perm)
    for k in ("a", "b", "s"):
        np.testing.assert_array_equal(got[k], np.concatenate([p[k] for p in parts])[perm])
        assert got[k].dtype == parts[0][k].dtype


def test_missing_shard_column_is_a_data_contract_error(prepared, tmp_path):
    state = json.loads(json.dumps(prepared.feature_state))
    state["numeric"].append({**state["numeric"][0], "name": "n__nope", "source": "nope"})
    spec = InputSpec.from_feature_state(state)
    with pytest.raises(DataContractError, match="n__nope"):
        next(iter_batches(prepared.split("train").url, spec, ReadOptions(batch_size=10, num_epochs=1)))


@pytest.mark.parametrize("imbalance,q_or_w", [("downsample", 0.1), ("class_weight", 20.0)])
def test_prior_correction_restores_the_base_rate(imbalance, q_or_w):
    from downpour.config import TrainingConfig

    # A calibrated model of the resampled stream predicts p' = p / (p + (1 - p) q) (negatives kept
    # with probability q), or p w / (p w + 1 - p) (positives weighted w); the exported correction
    # must map p' back to p.
    t = TrainingConfig(imbalance=imbalance, downsample_negatives=q_or_w if imbalance == "downsample" else 1.0)
    p = np.array([0.001, 0.005, 0.05, 0.5, 0.9])
    if imbalance == "downsample":
        shift = logit_shift(t, 1.0)
        trained = p / (p + (1 - p) * q_or_w)
    else:
        shift = logit_shift(t, q_or_w)
        trained = p * q_or_w / (p * q_or_w + 1 - p)
    np.testing.assert_allclose(served_score(np.log(trained) - np.log1p(-trained), shift), p, rtol=1e-3)
