"""Model-parallel placement on real (logical) devices, and hybrid Horovod data + model parallelism.

TensorFlow configures its devices once per process, so the device checks run in fresh Python
processes (the scripts below) and report JSON; the pure placement logic is tested here directly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from downpour.config import TrainingConfig
from downpour.errors import ConfigError
from downpour.training.model import build_model
from downpour.training.placement import (
    parameter_bytes_by_device,
    resolve_placement,
    sparse_as_dense,
    worker_devices,
)

ROOT = Path(__file__).resolve().parents[1]
SPEC = {
    "numeric": [{"name": "n__a"}, {"name": "n__b"}],
    "flags": [{"name": "n__a__missing"}],
    "categorical": [
        {"name": "c__x", "cardinality": 7, "embedding_dim": 3},
        {"name": "c__y", "cardinality": 101, "embedding_dim": 5},
    ],
    "crosses": [{"name": "c__x_x_y", "cardinality": 50}],
}


def run_script(code: str, *args: str, timeout: int = 120) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- pure placement logic ----------------------------------------------------------------------------
def test_resolve_placement_defaults_and_index_map():
    devs = ["/CPU:0", "/job:localhost/replica:0/task:0/device:CPU:1"]
    plan = resolve_placement({"embeddings": "sharded", "deep_tower": 1}, 2, devs)
    assert plan["embeddings"].devices == ("/CPU:0", "/CPU:1") and plan["embeddings"].sharded
    assert plan["deep_tower"].devices == ("/CPU:1",)
    assert plan["head"].devices == ("/CPU:0",) and plan["wide"].devices == ("/CPU:0",)  # unmapped -> 0
    # one device per worker and no map: TensorFlow (and Horovod's per-rank pinning) decides
    assert all(p.devices == () for p in resolve_placement({}, 1, None).values())


@pytest.mark.parametrize(
    "placement,dpw,devices,match",
    [
        ({"deep_tower": "sharded"}, 2, ["/CPU:0", "/CPU:1"], r"training\.placement\.deep_tower"),
        ({"head": 2}, 2, ["/CPU:0", "/CPU:1"], r"training\.placement\.head: device 2 out of range"),
        ({"tower": 0}, 2, ["/CPU:0", "/CPU:1"], r"training\.placement\.tower: unknown model part"),
        ({"embeddings": "gpu"}, 2, ["/CPU:0", "/CPU:1"], "expected a device index or 'sharded'"),
        ({}, 2, ["/CPU:0"], r"training\.devices_per_worker: 2 devices needed, only 1"),
    ],
)
def test_bad_placement_is_a_config_error(placement, dpw, devices, match):
    with pytest.raises(ConfigError, match=match):
        resolve_placement(placement, dpw, devices)
    tcfg = TrainingConfig.model_construct(**{**TrainingConfig().model_dump(), "placement": placement,
                                             "devices_per_worker": dpw})
    with pytest.raises(ConfigError, match=match):
        build_model(SPEC, tcfg, devices)


def test_single_device_accounting_and_sparse_as_dense_choice():
    assert worker_devices(1) == ["/CPU:0"]  # no GPU in CI; k=1 never reconfigures devices
    model = build_model(SPEC, TrainingConfig(hidden_units=[4]))
    assert parameter_bytes_by_device(model) == {"/CPU:0": model.count_params() * 4}
    # small CRM vocabularies: allreducing the dense table is cheaper than allgathering rows
    assert sparse_as_dense(model, batch_size=1024, workers=2) is True
    big = build_model({"categorical": [{"name": "c__id", "cardinality": 2_000_000, "embedding_dim": 16}]},
                      TrainingConfig(hidden_units=[4]))
    assert sparse_as_dense(big, batch_size=1024, workers=2) is False


# ---- real devices, fresh process ---------------------------------------------------------------------
DEVICES_SCRIPT = r"""
import json, sys
import numpy as np
from downpour.training.placement import worker_devices, parameter_bytes_by_device, describe, canonical_device
devs = worker_devices(4)                     # first TF call of the process
import tensorflow as tf
from downpour.config import TrainingConfig
from downpour.training.model import build_model, transfer_weights

out = {"devices": devs, "logical": [d.name for d in tf.config.list_logical_devices("CPU")]}
out["again"] = worker_devices(2)             # TF initialised, the existing 4 suffice
try:
    worker_devices(8)
    out["too_many"] = None
except RuntimeError as exc:
    out["too_many"] = str(exc)

spec = json.loads(sys.argv[1])
base = dict(hidden_units=[8, 4], dropout=0.0, seed=5)
plain = build_model(spec, TrainingConfig(**base))
placed = build_model(spec, TrainingConfig(**base, devices_per_worker=2, placement={
    "embeddings": "sharded", "wide": "sharded", "deep_tower": 1, "head": 0}), devs[:2])
out["var_devices"] = {v.name: canonical_device(v.device) for v in placed.weights}
out["describe"] = describe(placed)
out["init_equal"] = all(
    np.array_equal(a, b) for a, b in zip(
        [t.full_table() for t in plain.get_layer("embeddings").tables],
        [t.full_table() for t in placed.get_layer("embeddings").tables]))

rng = np.random.default_rng(0)
for v in plain.weights:                      # random weights everywhere, then copy them over
    v.assign(rng.normal(scale=0.3, size=v.shape).astype("float32"))
transfer_weights(plain, placed)
n = 64
x = {"n__a": rng.normal(size=n).astype("float32"), "n__b": rng.normal(size=n).astype("float32"),
     "n__a__missing": rng.integers(0, 2, n).astype("float32"), "c__x": rng.integers(0, 7, n),
     "c__y": rng.integers(0, 101, n), "c__x_x_y": rng.integers(0, 50, n)}
y = rng.integers(0, 2, (n, 1)).astype("float32")

def step(model):
    @tf.function
    def f():
        with tf.GradientTape() as tape:
            p = model(x, training=True)
            loss = tf.reduce_mean(tf.keras.losses.binary_crossentropy(y, p))
        return p, tape.gradient(loss, model.trainable_weights)
    p, grads = f()
    return p.numpy(), grads

def logical_grads(model, grads):
    # concatenate each table's per-shard gradients back into one [cardinality, dim] array
    by_var = {v.ref(): g for v, g in zip(model.trainable_weights, grads)}
    out = []
    for part in ("embeddings", "wide"):
        for t in model.get_layer(part).tables:
            out.append(np.concatenate([tf.convert_to_tensor(by_var[s.ref()]).numpy() for s in t.shards]))
    out.append(by_var[model.get_layer("wide").kernel.ref()].numpy())
    for part in ("deep_tower", "head"):
        out += [by_var[w.ref()].numpy() for w in model.get_layer(part).trainable_weights]
    return out

p_plain, g_plain = step(plain)
p_placed, g_placed = step(placed)
out["output_diff"] = float(np.abs(p_plain - p_placed).max())
out["grad_diff"] = max(float(np.abs(a - b).max())
                       for a, b in zip(logical_grads(plain, g_plain), logical_grads(placed, g_placed)))
out["sparse_grads"] = [type(g).__name__ for v, g in zip(placed.trainable_weights, g_placed) if "shard" in v.name]

# a compiled fit runs the cross-device graph; optimizer slots sit beside their variables
placed.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss="binary_crossentropy")
placed.fit(x, y, epochs=1, batch_size=16, verbose=0)
var_dev = {v.name: canonical_device(v.device) for v in placed.trainable_weights}
slots = [s for s in placed.optimizer.variables if s.name.startswith(("Adam/m/", "Adam/v/"))]
out["slot_devices_match"] = len(slots) == 2 * len(var_dev) and all(
    canonical_device(s.device) == var_dev[s.name.split("/", 2)[2]] for s in slots)
placed.save(sys.argv[2])
np.save(sys.argv[2] + ".pred.npy", placed.predict(x, verbose=0))
np.savez(sys.argv[2] + ".x.npz", **x)

# one 4-way sharded table: each device holds about a quarter of it
big = build_model({"categorical": [{"name": "c__id", "cardinality": 10001, "embedding_dim": 8}]},
                  TrainingConfig(hidden_units=[4], devices_per_worker=4, placement={"embeddings": "sharded"}),
                  devs)
out["big_bytes"] = parameter_bytes_by_device(big)
out["big_table_bytes"] = 10001 * 8 * 4
out["big_dense_bytes"] = sum(int(np.prod(w.shape)) * 4 for p in ("wide", "deep_tower", "head")
                             for w in big.get_layer(p).weights)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def device_report(tmp_path_factory) -> tuple[dict, Path]:
    saved = tmp_path_factory.mktemp("placed") / "placed.keras"
    return run_script(DEVICES_SCRIPT, json.dumps(SPEC), str(saved)), saved


def test_worker_devices_creates_logical_cpus_once(device_report):
    rep, _ = device_report
    assert rep["devices"] == ["/CPU:0", "/CPU:1", "/CPU:2", "/CPU:3"]
    assert len(rep["logical"]) == 4
    assert rep["again"] == ["/CPU:0", "/CPU:1"]
    assert "already initialised with 4" in rep["too_many"] and "worker_devices(8)" in rep["too_many"]


def test_variables_live_where_the_placement_map_says(device_report):
    rep, _ = device_report
    devs = rep["var_devices"]
    for name in ("embeddings/c__x", "embeddings/c__y", "wide/c__x", "wide/c__y", "wide/c__x_x_y"):
        assert devs[f"{name}/shard_0:0"] == "/CPU:0"
        assert devs[f"{name}/shard_1:0"] == "/CPU:1"
    assert devs["wide/dense_kernel:0"] == "/CPU:0"  # the wide part's home: its first device
    tower = [d for n, d in devs.items() if n.startswith("deep_tower/")]
    head = [d for n, d in devs.items() if n.startswith("head/")]
    assert len(tower) == 4 and set(tower) == {"/CPU:1"}
    assert len(head) == 2 and set(head) == {"/CPU:0"}
    assert "deep_tower->/CPU:1" in rep["describe"] and "head->/CPU:0" in rep["describe"]
    assert "sharded over /CPU:0,/CPU:1" in rep["describe"]


def test_sharded_placed_model_equals_unsharded_model(device_report):
    rep, _ = device_report
    assert rep["init_equal"]
    assert rep["output_diff"] <= 1e-5
    assert rep["grad_diff"] <= 1e-5
    assert rep["sparse_grads"] and set(rep["sparse_grads"]) == {"IndexedSlices"}
    assert rep["slot_devices_match"]


def test_parameter_bytes_split_about_evenly_across_a_k_way_table(device_report):
    rep, _ = device_report
    by_dev, table, dense = rep["big_bytes"], rep["big_table_bytes"], rep["big_dense_bytes"]
    assert sorted(by_dev) == ["/CPU:0", "/CPU:1", "/CPU:2", "/CPU:3"]
    assert sum(by_dev.values()) == table + dense
    row = 8 * 4
    assert abs(by_dev["/CPU:0"] - dense - table / 4) <= row
    for d in ("/CPU:1", "/CPU:2", "/CPU:3"):
        assert abs(by_dev[d] - table / 4) <= row


def test_model_saved_on_four_devices_loads_on_one(device_report):
    """Serving hosts have one device: the saved placement falls back softly, predictions unchanged."""
    _, saved = device_report
    x = dict(np.load(str(saved) + ".x.npz"))
    model = tf.keras.models.load_model(saved)
    np.testing.assert_allclose(model.predict(x, verbose=0), np.load(str(saved) + ".pred.npy"), atol=1e-6)


# ---- hybrid: Horovod data parallelism x in-worker model parallelism --------------------------------
HVD_SCRIPT = r"""
import json, sys
import numpy as np
from downpour.training.placement import worker_devices
devs = worker_devices(2)
import tensorflow as tf
import horovod.tensorflow as hvd_tf
import horovod.tensorflow.keras as hvd
from downpour.config import TrainingConfig
from downpour.training.model import build_model
from downpour.training.rank import distributed_optimizer, plain_allreduce_tracing

hvd.init()
plain_allreduce_tracing()  # as every rank of `downpour train` does: the averages below check that path
rank, size = hvd.rank(), hvd.size()
spec = json.loads(sys.argv[1])
tcfg = TrainingConfig(hidden_units=[8], dropout=0.0, seed=9, devices_per_worker=2,
                      placement={"embeddings": "sharded", "wide": "sharded", "deep_tower": 1, "head": 0})
n, b, lr = 48, 8, 0.5

def data(r):
    rng = np.random.default_rng(100 + r)
    x = {"n__a": rng.normal(size=n).astype("float32"), "n__b": rng.normal(size=n).astype("float32"),
         "n__a__missing": rng.integers(0, 2, n).astype("float32"), "c__x": rng.integers(0, 7, n),
         "c__y": rng.integers(0, 101, n), "c__x_x_y": rng.integers(0, 50, n)}
    y = ((x["c__x"] == 2) | (x["n__a"] > 0.5)).astype("float32")[:, None]
    return x, y

def logical(model):
    out = {}
    for part in ("embeddings", "wide"):
        for t in model.get_layer(part).tables:
            out[f"{part}/{t.name}"] = t.full_table()
    out["wide/dense_kernel"] = model.get_layer("wide").kernel.numpy()
    for part in ("deep_tower", "head"):
        for i, w in enumerate(model.get_layer(part).get_weights()):
            out[f"{part}/{i}"] = w
    return out

def horovod_ops(model):  # per train step fit traced: {Horovod op type: tensors each node takes}
    import collections
    found = set()
    for fn in model.train_function._list_all_concrete_functions():
        graph = fn.graph.as_graph_def()
        ops = collections.defaultdict(list)
        for n in list(graph.node) + [n for f in graph.library.function for n in f.node_def]:
            if n.op.startswith("Horovod"):
                ops[n.op].append(n.attr["num_tensors"].i if "num_tensors" in n.attr else 1)
        found.add(json.dumps({k: sorted(v) for k, v in ops.items()}, sort_keys=True))
    return [json.loads(x) for x in sorted(found)]

VARIANTS = ((False, 0), (True, 0), (False, 1), (True, 1), (False, 2), (True, 100))
report = {"rank": rank, "size": size, "ops": {}}
x, y = data(rank)
for dense, groups in VARIANTS:
    model = build_model(spec, tcfg, devs)
    rng = np.random.default_rng(1000 + rank)      # every rank starts different ...
    for v in model.weights:
        v.assign(rng.normal(scale=0.3, size=v.shape).astype("float32"))
    hvd_tf.broadcast_variables(model.variables, root_rank=0)   # ... until rank 0's weights are broadcast
    init = logical(model)
    opt = distributed_optimizer(tf.keras.optimizers.SGD(lr), model, groups, dense)  # as a rank builds it
    model.compile(optimizer=opt, loss="binary_crossentropy")
    model.fit(x, y, batch_size=b, epochs=1, shuffle=False, verbose=0)
    got = logical(model)
    report["ops"][f"dense{int(dense)}_groups{groups}"] = horovod_ops(model)
    np.savez(f"{sys.argv[2]}/rank{rank}_dense{int(dense)}_groups{groups}.npz", **got)
    if rank == 0 and not groups:
        # reference: one process, unsharded model, SGD on each step's global batch (all ranks' rows)
        np.savez(f"{sys.argv[2]}/init_dense{int(dense)}.npz", **init)
        ref = build_model(spec, TrainingConfig(hidden_units=[8], dropout=0.0, seed=9))
        for part in ("embeddings", "wide"):
            for t in ref.get_layer(part).tables:
                t.set_full_table(init[f"{part}/{t.name}"])
        ref.get_layer("wide").kernel.assign(init["wide/dense_kernel"])
        for part in ("deep_tower", "head"):
            layer = ref.get_layer(part)
            layer.set_weights([init[f"{part}/{i}"] for i in range(len(layer.get_weights()))])
        xs = [data(r) for r in range(size)]
        sgd = tf.keras.optimizers.SGD(lr)
        for s in range(n // b):
            gx = {k: np.concatenate([xr[k][s * b:(s + 1) * b] for xr, _ in xs]) for k in x}
            gy = np.concatenate([yr[s * b:(s + 1) * b] for _, yr in xs])
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.keras.losses.binary_crossentropy(gy, ref(gx, training=True)))
            grads = tape.gradient(loss, ref.trainable_weights)
            sgd.apply_gradients(zip(grads, ref.trainable_weights))
        np.savez(f"{sys.argv[2]}/reference_dense{int(dense)}.npz", **logical(ref))
if rank == 0:
    print("REPORT " + json.dumps(report))
"""


def test_horovod_traces_its_gradient_allreduce_without_autograph_once_asked():
    """``plain_allreduce_tracing`` takes hold on the installed Horovod (its hook is where the rank expects
    it, and the gradient allreduce Horovod builds goes through it), once however often it is called; the
    two-rank test below checks the averages it traces."""
    import horovod.tensorflow as hvd_tf

    from downpour.training.rank import plain_allreduce_tracing

    before = hvd_tf._make_subgraph
    try:
        assert before(lambda x: x)._autograph is True, "Horovod's own hook traces with AutoGraph"
        plain_allreduce_tracing()
        patched = hvd_tf._make_subgraph
        assert patched is not before and patched(lambda x: x)._autograph is False
        plain_allreduce_tracing()
        assert hvd_tf._make_subgraph is patched
        # what DistributedOptimizer builds goes through the hook (a name of its own: Horovod caches by it)
        grads = hvd_tf._make_allreduce_grads_fn("downpour_plain_tracing_test", "", "", hvd_tf.Compression.none,
                                                False, hvd_tf.Average, 1.0, None, hvd_tf.global_process_set)
        assert grads._autograph is False
    finally:
        hvd_tf._make_subgraph = before


@pytest.mark.slow
def test_horovod_two_ranks_with_two_devices_each_match_single_process_sgd(tmp_path):
    """2 ranks x 2 logical devices, sharded tables: after broadcast + 6 DistributedOptimizer steps
    on different data per rank, both ranks hold identical weights equal to one process doing SGD on
    the global batches, with sparse (allgathered IndexedSlices) and with dense gradient averaging, each
    gradient averaged on its own (Horovod's default) or all in one grouped collective
    (``training.allreduce_groups: 1``, which a rank builds through ``rank.distributed_optimizer``)."""
    horovodrun = Path(sys.executable).with_name("horovodrun")
    if not horovodrun.exists():
        horovodrun = Path(shutil.which("horovodrun") or "horovodrun")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1"}
    proc = subprocess.run(
        [str(horovodrun), "--gloo", "-np", "2", "-H", "localhost:2", sys.executable, "-c", HVD_SCRIPT,
         json.dumps(SPEC), str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (line,) = [x for x in proc.stdout.splitlines() if "REPORT " in x]
    ops = json.loads(line.split("REPORT ", 1)[1])["ops"]
    # the setting decides the collectives (the model: 15 trainable weights, 10 of them table shards):
    # per gradient, each on its own (a shard's sparse gradient as two allgathers, values and indices);
    # grouped, every dense gradient in one allreduce and the shards' sparse ones in one pair of allgathers
    assert ops == {"dense0_groups0": [{"HorovodAllgather": [1] * 20, "HorovodAllreduce": [1] * 5}],
                   "dense1_groups0": [{"HorovodAllreduce": [1] * 15}],
                   "dense0_groups1": [{"HorovodGroupedAllgather": [10, 10], "HorovodGroupedAllreduce": [5]}],
                   "dense1_groups1": [{"HorovodGroupedAllreduce": [15]}],
                   # up to n groups: more groups than gradients leaves one gradient per group
                   "dense0_groups2": [{"HorovodGroupedAllgather": [10, 10], "HorovodGroupedAllreduce": [2, 3]}],
                   "dense1_groups100": [{"HorovodGroupedAllreduce": [1] * 15}]}, ops
    for dense, groups in ((0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 100)):
        r0 = np.load(tmp_path / f"rank0_dense{dense}_groups{groups}.npz")
        r1 = np.load(tmp_path / f"rank1_dense{dense}_groups{groups}.npz")
        ref = np.load(tmp_path / f"reference_dense{dense}.npz")
        assert set(r0.files) == set(ref.files) and "embeddings/c__y" in r0.files
        for key in ref.files:
            np.testing.assert_array_equal(r0[key], r1[key], err_msg=f"ranks diverged on {key}")
            np.testing.assert_allclose(r0[key], ref[key], atol=1e-5,
                                       err_msg=f"{key} (sparse_as_dense={dense}, groups={groups})")
        # every part trained (equal-to-reference would hold vacuously for frozen weights)
        init = np.load(tmp_path / f"init_dense{dense}.npz")
        for key in ("embeddings/c__y", "wide/c__x_x_y", "wide/dense_kernel", "deep_tower/0", "head/0"):
            assert np.abs(r0[key] - init[key]).max() > 1e-4, key
