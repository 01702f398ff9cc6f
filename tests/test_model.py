"""The wide & deep model and its row-sharded embedding tables, in this process (one CPU device).

Multi-device placement (real logical devices, Horovod) is tested in fresh processes in
test_placement.py, because TensorFlow configures its devices once per process.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from downpour.config import TrainingConfig
from downpour.errors import DataContractError
from downpour.training.model import (
    ShardedEmbedding,
    _names,
    build_model,
    default_embedding_dim,
    input_columns,
    shard_sizes,
    transfer_weights,
)

SPEC = {
    "version": 1,
    "numeric": [{"name": "n__amount"}, {"name": "n__tenure"}],
    "flags": [{"name": "n__amount__missing"}],
    "categorical": [
        {"name": "c__country", "cardinality": 7, "embedding_dim": 3},
        {"name": "c__plan", "cardinality": 40, "embedding_dim": None},
    ],
    "crosses": [{"name": "c__country_x_plan", "cardinality": 30}],
}
TCFG = TrainingConfig(hidden_units=[8, 4], dropout=0.0, seed=3)


def batch(n: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "n__amount": rng.normal(size=n).astype("float32"),
        "n__tenure": rng.normal(size=n).astype("float32"),
        "n__amount__missing": rng.integers(0, 2, n).astype("float32"),
        "c__country": rng.integers(0, 7, n),
        "c__plan": rng.integers(0, 40, n),
        "c__country_x_plan": rng.integers(0, 30, n),
    }


def perturb(model: tf.keras.Model, seed: int = 1) -> None:
    """Random weights everywhere (the wide part starts at zero, which would hide routing bugs)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        v.assign(rng.normal(scale=0.3, size=v.shape).astype("float32"))


def dense_grad(g: tf.Tensor | tf.IndexedSlices) -> np.ndarray:
    return tf.convert_to_tensor(g).numpy()


def test_default_embedding_dim_rule_of_thumb():
    assert default_embedding_dim(1) == 2
    assert default_embedding_dim(3) == 3  # 1.6 * 3 ** 0.56 = 2.96
    assert default_embedding_dim(100) == round(1.6 * 100**0.56) == 21
    assert default_embedding_dim(1000) == 50  # 1.6 * 1000 ** 0.56 = 76.6, capped
    assert default_embedding_dim(10**7) == 50
    assert all(1 <= default_embedding_dim(c) <= 50 for c in (1, 2, 10, 10**4))


def test_model_inputs_output_and_named_parts():
    model = build_model(SPEC, TCFG)
    assert {i.name: i.dtype for i in model.inputs} == dict(input_columns(SPEC))
    assert {i.name: i.dtype for i in model.inputs}["c__plan"] == tf.int64
    assert {i.name: i.dtype for i in model.inputs}["n__amount__missing"] == tf.float32
    assert all(i.shape.as_list() == [None] for i in model.inputs)
    assert model.output_names == ["score"]
    for part in ("embeddings", "wide", "deep_tower", "head"):
        model.get_layer(part)
    tables = {t.name: t for t in model.get_layer("embeddings").tables}
    assert tables["c__country"].output_dim == 3
    assert tables["c__plan"].output_dim == default_embedding_dim(40)
    assert model.get_layer("wide").tables[0].output_dim == 1
    out = model(batch(16)).numpy()
    assert out.shape == (16, 1)
    assert ((out > 0) & (out < 1)).all()


def test_the_wide_part_is_a_linear_model_over_every_feature():
    """With the deep logit at zero, the model is exactly a logistic regression over all features."""
    model = build_model(SPEC, TCFG)
    wide = model.get_layer("wide")
    linear = [*_names(SPEC["categorical"]), *_names(SPEC["crosses"])]
    assert [t.name for t in wide.tables] == linear
    dense = [*_names(SPEC["numeric"]), *_names(SPEC.get("flags") or [])]
    assert wide.dense == dense
    rng = np.random.default_rng(3)
    for t in wide.tables:
        t.set_full_table(rng.normal(size=(t.cardinality, 1)))
    wide.kernel.assign(rng.normal(size=(len(dense), 1)).astype(np.float32))
    head = model.get_layer("head")
    head.logit.kernel.assign(tf.zeros_like(head.logit.kernel))
    head.logit.bias.assign([0.25])
    x = batch(32)
    expected = 0.25 + sum(wide.tables[i].full_table()[x[c].astype(int), 0] for i, c in enumerate(linear))
    expected = expected + np.stack([x[n] for n in dense], axis=-1).astype(np.float32) @ wide.kernel.numpy()[:, 0]
    np.testing.assert_allclose(model(x).numpy()[:, 0], 1 / (1 + np.exp(-expected)), rtol=1e-5, atol=1e-6)


def test_model_without_crosses_or_numerics():
    no_crosses = build_model({**SPEC, "crosses": []}, TCFG)
    assert [t.name for t in no_crosses.get_layer("wide").tables] == _names(SPEC["categorical"])
    only_cat = build_model({"categorical": SPEC["categorical"]}, TCFG)
    x = {k: v for k, v in batch(4).items() if k in ("c__country", "c__plan")}
    assert only_cat(x).shape == (4, 1)


def test_init_is_deterministic_from_seed():
    a, b = build_model(SPEC, TCFG), build_model(SPEC, TCFG)
    other = build_model(SPEC, TCFG.model_copy(update={"seed": 4}))
    for va, vb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    emb_a = a.get_layer("embeddings").tables[0].full_table()
    emb_o = other.get_layer("embeddings").tables[0].full_table()
    assert not np.allclose(emb_a, emb_o)
    assert not np.allclose(a.get_layer("deep_tower").get_weights()[0], other.get_layer("deep_tower").get_weights()[0])


@pytest.mark.parametrize("cardinality,k", [(1, 2), (2, 2), (5, 2), (7, 3), (100, 4), (9, 9)])
def test_sharded_table_equals_unsharded_table(cardinality, k):
    """Routing by id to contiguous row blocks is exact: outputs and gradients equal the unsharded
    table's, and each block's gradient is IndexedSlices over its own rows."""
    full = ShardedEmbedding(cardinality, 4, name="full")
    sharded = ShardedEmbedding(cardinality, 4, devices=["/CPU:0"] * k, name="sharded")
    full.build((None,))
    sharded.build((None,))
    table = np.random.default_rng(cardinality).normal(size=(cardinality, 4)).astype("float32")
    full.set_full_table(table)
    sharded.set_full_table(table)
    np.testing.assert_array_equal(sharded.full_table(), table)
    assert sharded.num_shards == min(k, cardinality)
    assert sum(sharded.sizes) == cardinality and max(sharded.sizes) - min(sharded.sizes) <= 1

    ids = tf.constant(np.r_[np.arange(cardinality), np.arange(cardinality)[::-1], [0, cardinality - 1]])
    upstream = tf.constant(np.random.default_rng(0).normal(size=(len(ids), 4)).astype("float32"))
    grads = {}
    for name, layer in (("full", full), ("sharded", sharded)):
        with tf.GradientTape() as tape:
            out = layer(ids)
            loss = tf.reduce_sum(out * upstream)
        np.testing.assert_array_equal(out.numpy(), table[ids.numpy()])
        g = tape.gradient(loss, layer.trainable_weights)
        assert all(isinstance(x, tf.IndexedSlices) for x in g)
        grads[name] = np.concatenate([dense_grad(x) for x in g], axis=0)
    np.testing.assert_allclose(grads["sharded"], grads["full"], atol=1e-6)


def test_sharded_gradient_touches_only_used_rows():
    layer = ShardedEmbedding(10, 2, devices=["/CPU:0", "/CPU:0"])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(tf.constant([1, 1, 8], dtype=tf.int64)))
    g0, g1 = tape.gradient(loss, layer.trainable_weights)
    assert sorted(set(g0.indices.numpy())) == [1]      # global id 1 -> block 0 row 1
    assert sorted(set(g1.indices.numpy())) == [3]      # global id 8 -> block 1 (rows 5..9) row 3
    assert shard_sizes(10, 2) == [5, 5] and shard_sizes(7, 3) == [3, 2, 2]


def test_out_of_range_ids_read_the_oov_row():
    layer = ShardedEmbedding(5, 3, devices=["/CPU:0", "/CPU:0"])
    layer.build((None,))
    table = np.arange(15, dtype="float32").reshape(5, 3)
    layer.set_full_table(table)
    out = layer(tf.constant([-1, 5, 99, 4], dtype=tf.int64)).numpy()
    np.testing.assert_array_equal(out, table[[0, 0, 0, 4]])
    with pytest.raises(ValueError, match="table shape"):
        layer.set_full_table(np.zeros((4, 3)))


def test_initial_table_does_not_depend_on_the_sharding():
    """Init is generated in fixed row chunks, so a k-way table starts equal to the 1-way table
    (9000 rows crosses the 4096-row chunk boundary)."""
    one = ShardedEmbedding(9000, 2, seed=11)
    three = ShardedEmbedding(9000, 2, devices=["/CPU:0"] * 3, seed=11)
    one.build((None,))
    three.build((None,))
    np.testing.assert_array_equal(one.full_table(), three.full_table())
    assert np.abs(one.full_table()).max() <= 0.05 and one.full_table().std() > 0.01


def test_transfer_weights_between_placements():
    tcfg_sharded = TCFG.model_copy(
        update={"devices_per_worker": 2, "placement": {"embeddings": "sharded", "wide": "sharded"}}
    )
    src = build_model(SPEC, TCFG)
    dst = build_model(SPEC, tcfg_sharded, devices=["/CPU:0", "/CPU:0"])
    assert dst.get_layer("embeddings").tables[1].num_shards == 2
    perturb(src)
    x = batch()
    assert not np.allclose(src(x).numpy(), dst(x).numpy())
    transfer_weights(src, dst)
    np.testing.assert_allclose(dst(x).numpy(), src(x).numpy(), atol=1e-6)
    back = build_model(SPEC, TCFG)
    transfer_weights(dst, back)
    np.testing.assert_allclose(back(x).numpy(), src(x).numpy(), atol=1e-6)


def test_save_and_load_keras_and_savedmodel(tmp_path):
    tcfg = TCFG.model_copy(update={"devices_per_worker": 2, "placement": {"embeddings": "sharded"}})
    model = build_model(SPEC, tcfg, devices=["/CPU:0", "/CPU:0"])
    perturb(model)
    x = batch()
    expected = model.predict(x, verbose=0)

    model.save(tmp_path / "m.keras")
    loaded = tf.keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    assert loaded.get_layer("embeddings").tables[0].num_shards == 2

    tf.saved_model.save(model, str(tmp_path / "sm"))
    serve = tf.saved_model.load(str(tmp_path / "sm")).signatures["serving_default"]
    got = serve(**{k: tf.constant(v) for k, v in x.items()})["score"].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_fit_learns_a_categorical_and_a_cross_signal():
    n = 512
    x = batch(n, seed=5)
    y = ((x["c__country"] == 3) | (x["c__country_x_plan"] == 7) | (x["n__amount"] > 1.5)).astype("float32")
    model = build_model(SPEC, TCFG.model_copy(update={"dropout": 0.1}))
    model.compile(optimizer=tf.keras.optimizers.Adam(0.05), loss="binary_crossentropy")
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=15, batch_size=64, verbose=0, shuffle=True)
    assert model.evaluate(x, y, verbose=0) < 0.5 * first
    assert np.abs(model.get_layer("wide").tables[0].full_table()).max() > 0  # the wide part trained


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"categorical": [{"name": "c__a"}]}, r"categorical\[0\].*cardinality"),
        ({"categorical": [{"name": "c__a", "cardinality": 0}]}, r"c__a.*>= 1"),
        ({"categorical": [{"name": "c__a", "cardinality": 3, "embedding_dim": 0}]}, "embedding_dim"),
        ({"numeric": [{"name": "n__a"}], "crosses": [{"name": "c__x", "cardinality": "many"}]}, r"crosses\[0\]"),
        ({"numeric": [], "crosses": [{"name": "c__x", "cardinality": 5}]}, "no numeric"),
    ],
)
def test_bad_feature_state_is_a_data_contract_error(spec, match):
    with pytest.raises(DataContractError, match=match):
        build_model(spec, TCFG)
