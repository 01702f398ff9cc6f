"""Evaluation, gate and batch scoring against real Spark and real TensorFlow SavedModels.

The fast tests use a synthetic ``prepared/`` directory (``benchmarks.synthetic``) and small SavedModels
built here with TensorFlow (the known true logistic model of that data, and a scrambled one), so the
evaluation stage is exercised without the minutes a Horovod training run takes. The slow test at the
end runs the real thing: prepare -> train -> evaluate -> gate -> score.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from benchmarks import synthetic
from downpour.config import config_from_dict
from downpour.errors import GateRefused

NUMERIC, CATEGORICAL, CARD = 3, 2, 6


def _true_coefficients() -> tuple[np.ndarray, list[np.ndarray]]:
    """The coefficients ``benchmarks.synthetic`` draws its labels from (same generator, same order)."""
    rng = np.random.default_rng(12345)
    w = np.array([rng.normal(0, 1.0) for _ in range(NUMERIC)])
    tables = [rng.normal(0, 1.0, CARD) for _ in range(CATEGORICAL)]
    return w, tables


def _logit(pdf: pd.DataFrame, w: np.ndarray, tables: list[np.ndarray]) -> np.ndarray:
    z = sum(w[i] * pdf[f"n__x{i}"].to_numpy(np.float64) for i in range(NUMERIC))
    for j, t in enumerate(tables):
        z = z + t[pdf[f"c__k{j}"].to_numpy()]
    return z


def _save_model(root: Path, version: str, w: np.ndarray, tables: list[np.ndarray], data_version: str) -> Path:
    """A SavedModel with the ``serve_features`` signature of the contract: sigmoid(w.x + table[k])."""
    import tensorflow as tf

    specs = {f"n__x{i}": tf.TensorSpec([None], tf.float32, name=f"n__x{i}") for i in range(NUMERIC)}
    specs |= {f"c__k{j}": tf.TensorSpec([None], tf.int64, name=f"c__k{j}") for j in range(CATEGORICAL)}
    specs["c__k0_x_k1"] = tf.TensorSpec([None], tf.int64, name="c__k0_x_k1")

    class Linear(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(w, dtype=tf.float64)
            self.tables = [tf.Variable(t, dtype=tf.float64) for t in tables]

        @tf.function(input_signature=[specs])
        def serve(self, inputs):
            z = tf.add_n([tf.cast(inputs[f"n__x{i}"], tf.float64) * self.w[i] for i in range(NUMERIC)])
            for j, t in enumerate(self.tables):
                z += tf.gather(t, inputs[f"c__k{j}"])
            return {"score": tf.cast(tf.sigmoid(z), tf.float32)}

    model_dir = root / "model"
    module = Linear()
    tf.saved_model.save(module, str(model_dir / "saved_model"),
                        signatures={"serve_features": module.serve.get_concrete_function()})
    card = {"name": "synthetic", "model_version": version, "data_version": data_version,
            "training": {"workers": 1, "epochs_completed": 2}}
    (model_dir / "model_card.json").write_text(json.dumps(card))
    (model_dir / "history.json").write_text(json.dumps({"loss": [0.6, 0.5], "val_loss": [0.62, 0.55]}))
    return model_dir


def _cfg(out: Path, **evaluation):
    return config_from_dict({
        "name": "synthetic", "input": {"path": str(out / "raw.csv")},
        "schema": {"id": "string", "x0": "double", "k0": "string", "y": "int"},
        "id_column": "id", "label": {"column": "y", "positive": 1},
        "features": {"numeric": ["x0"], "categorical": ["k0"]},
        "output": {"path": str(out)},
        "evaluation": {"precision_at_k": [10, 100], "fpr_points": [0.01, 0.1], "score_batch_rows": 97,
                       "registry": str(out / "registry"), "baseline_max_iter": 25, **evaluation},
    })


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    manifest = synthetic.write_prepared(str(root), {"train": 3000, "val": 1500, "test": 1500},
                                        row_group_rows=200, numeric=NUMERIC, categorical=CATEGORICAL,
                                        cardinality=CARD, positive_rate=0.25)
    return root, manifest["data_version"]


def test_evaluate_scores_metrics_card_and_report(spark, workdir):
    from downpour.training.evaluate import run_evaluation

    root, data_version = workdir
    w, tables = _true_coefficients()
    _save_model(root, "m-true", w, tables, data_version)
    cfg = _cfg(root, gbt_baseline=True, gbt_max_iter=10, gbt_max_depth=3, gbt_max_train_rows=2000,
               decision={"enabled": True, "action_cost": 1.0, "false_positive_cost": 2.0, "missed_cost": 10.0})
    res = run_evaluation(spark, cfg)

    # scores from mapInPandas (Arrow batches cut to 97 rows) equal the model computed in numpy
    test_shards = pd.read_parquet(root / "prepared" / "test")
    scores = pd.read_parquet(res["scores"] + "/split=test")
    assert len(scores) == len(test_shards) == 1500 and scores["row_id"].is_unique
    merged = test_shards.merge(scores, on="row_id", suffixes=("", "_s"))
    expected = 1 / (1 + np.exp(-_logit(merged, w, tables)))
    np.testing.assert_allclose(merged["score"], expected, atol=1e-6)

    # metrics equal scikit-learn's on the same scores
    t = res["metrics"]["test"]
    assert t["roc_auc"] == pytest.approx(roc_auc_score(merged["label"], merged["score"]), abs=1e-4)
    assert t["pr_auc"] == pytest.approx(average_precision_score(merged["label"], merged["score"]), abs=1e-4)
    assert t["rows"] == 1500 and {"recall_at_fpr_0.01", "precision_at_100", "log_loss"} <= set(t)

    # the baseline (LR on numerics + one-hot) can learn this linear truth: close to the true model
    b = res["baseline"]["test"]
    assert 0.6 < b["roc_auc"] <= t["roc_auc"] + 0.02
    # the second baseline, gradient-boosted trees on a 2,000-row train sample: its own figures, not the LR's
    g = res["baseline_gbt"]["test"]
    assert 0.6 < g["roc_auc"] <= t["roc_auc"] + 0.02 and g["roc_auc"] != b["roc_auc"]
    assert g["rows"] == 1500 and set(res["vs_baseline_gbt"]["splits"]) == {"val", "test"}

    card = json.loads((root / "model" / "model_card.json").read_text())
    assert card["metrics"]["val"]["roc_auc"] == pytest.approx(res["metrics"]["val"]["roc_auc"])
    assert set(card["metrics"]) == {"val", "test"} and set(card["baseline"]) == {"val", "test"}
    assert card["model_version"] == "m-true" and card["evaluation"]["gate"] is None

    report = Path(res["report"])
    doc = report.read_text()
    assert "m-true" in doc and "baseline test" in doc and (report.parent / "training.png").exists()
    assert "GBT baseline test" in doc and "Model against the GBT baseline" in doc
    assert card["baseline_gbt"]["test"]["roc_auc"] == pytest.approx(g["roc_auc"])
    assert "GBTClassifier (10 trees, depth 3" in card["evaluation"]["gbt_baseline_model"]
    assert "r0000" not in doc  # no row ids in the report
    full = json.loads((report.parent / "metrics.json").read_text())
    assert full["model"]["test"]["curves"]["fpr"][-1] == 1.0

    # the decision threshold: chosen on val, no cheaper one among the val scores (brute force over the
    # written scores); its test figures recomputed from the test scores
    from test_decision import assert_minimises, brute_force_cost

    from downpour.training.decision import Costs

    costs = Costs(1.0, 2.0, 10.0)
    chosen = card["decision"]
    assert chosen == res["decision"] and chosen["threshold"] is not None
    val = pd.read_parquet(res["scores"] + "/split=val").assign(missed_cost=0.0)
    assert_minimises(val, chosen["threshold"], costs, per_row=False)
    assert chosen["test"]["cost"] == pytest.approx(brute_force_cost(scores.assign(missed_cost=0.0),
                                                                    chosen["threshold"], costs, False))
    assert (report.parent / "decision.png").exists() and "Decision" in doc


def test_gate_promotes_first_refuses_worse_keeps_champion(spark, workdir, tmp_path):
    from downpour.training.evaluate import run_evaluation
    from downpour.training.registry import Registry

    root, data_version = workdir
    cfg = _cfg(root, baseline=False, registry=str(tmp_path / "registry"))
    w, tables = _true_coefficients()

    _save_model(root, "m-good", w, tables, data_version)
    res = run_evaluation(spark, cfg, gate=True)
    assert res["gate"]["promoted"] and res["gate"]["champion_version"] is None
    reg = Registry(tmp_path / "registry")
    assert reg.champion()["model_version"] == "m-good"
    assert (reg.champion_model_dir() / "saved_model" / "saved_model.pb").exists()

    rng = np.random.default_rng(0)
    _save_model(root, "m-scrambled", rng.normal(size=NUMERIC), [rng.normal(size=CARD) for _ in tables],
                data_version)
    with pytest.raises(GateRefused) as exc:
        run_evaluation(spark, cfg, gate=True)
    msg = str(exc.value)
    good_auc = res["metrics"]["test"]["roc_auc"]
    assert exc.value.exit_code == 4 and "m-scrambled" in msg and f"{good_auc:.4f}" in msg
    assert reg.champion()["model_version"] == "m-good"
    card = json.loads((root / "model" / "model_card.json").read_text())
    assert card["evaluation"]["gate"]["promoted"] is False  # the refusal is recorded on the card too
    assert "REFUSED" in (root / "report" / "report.html").read_text()
    assert [h["promoted"] for h in reg.history()] == [True, False]


def test_the_gate_can_require_the_model_to_match_its_baseline(spark, workdir, tmp_path, caplog):
    """A model that trails the LR baseline is reported as such on the card, in the report and in the log;
    with ``evaluation.gate.vs_baseline`` the gate refuses it even with no champion to lose to, and still
    promotes a model that matches the baseline. Without the option the same trailing model is promoted:
    the rule is what refuses it."""
    from downpour.training.evaluate import run_evaluation
    from downpour.training.registry import Registry

    root, data_version = workdir
    rng = np.random.default_rng(0)
    _save_model(root, "m-scrambled", rng.normal(size=NUMERIC), [rng.normal(size=CARD) for _ in range(CATEGORICAL)],
                data_version)
    with caplog.at_level("WARNING", logger="downpour"):
        res = run_evaluation(spark, _cfg(root, registry=str(tmp_path / "plain")), gate=True)
    assert res["gate"]["promoted"] and res["gate"]["baseline_value"] is None
    worse = res["vs_baseline"]["worse"]
    assert any(w.startswith("test roc_auc") for w in worse), res["vs_baseline"]
    test_auc = res["vs_baseline"]["splits"]["test"]["roc_auc"]
    assert test_auc["delta"] == pytest.approx(res["metrics"]["test"]["roc_auc"] - res["baseline"]["test"]["roc_auc"])
    assert any("worse than the LR baseline" in r.getMessage() for r in caplog.records)
    card = json.loads((root / "model" / "model_card.json").read_text())
    assert card["vs_baseline"]["worse"] == worse
    assert "MODEL TRAILS THE BASELINE" in (root / "report" / "report.html").read_text()

    strict = _cfg(root, registry=str(tmp_path / "strict"), gate={"vs_baseline": 0.01})
    with pytest.raises(GateRefused, match="LR baseline") as exc:
        run_evaluation(spark, strict, gate=True)
    assert exc.value.exit_code == 4 and Registry(tmp_path / "strict").champion() is None

    _save_model(root, "m-true", *_true_coefficients(), data_version)
    res = run_evaluation(spark, strict, gate=True)
    assert res["gate"]["promoted"] and res["vs_baseline"]["worse"] == []
    assert res["gate"]["baseline_value"] == pytest.approx(res["baseline"]["test"]["roc_auc"])
    assert Registry(tmp_path / "strict").champion()["model_version"] == "m-true"


def test_evaluate_without_a_model_says_what_to_run(spark, tmp_path):
    from downpour.errors import DataContractError
    from downpour.training.evaluate import run_evaluation

    synthetic.write_prepared(str(tmp_path), {"train": 50, "val": 20, "test": 20}, numeric=1, categorical=1,
                             cardinality=3)
    with pytest.raises(DataContractError, match="downpour train"):
        run_evaluation(spark, _cfg(tmp_path))
    with pytest.raises(DataContractError, match="downpour prepare"):
        run_evaluation(spark, _cfg(tmp_path / "nothing"))
    assert not os.path.exists(tmp_path / "report")


# ---- end to end on the real stack (prepare -> train -> evaluate -> gate -> score) ----------------------

def _copy_with_variables(model_root: Path, dest: Path, change: Callable[[dict], None]) -> None:
    """The exported model copied to ``dest`` with ``change({id: variable})`` applied to its variables
    before the SavedModel is written again (both signatures kept)."""
    import shutil

    import tensorflow as tf

    shutil.copytree(model_root, dest, symlinks=False)
    shutil.rmtree(dest / "saved_model")
    loaded = tf.saved_model.load(str(model_root / "saved_model"))
    variables = {id(v): v for sig in loaded.signatures.values() for v in sig.variables}
    assert variables
    change(variables)
    tf.saved_model.save(loaded, str(dest / "saved_model"), signatures=dict(loaded.signatures))


def _zero_weights_copy(model_root: Path, dest: Path, version: str) -> None:
    """The exported model with every variable set to zero: a constant score, ROC-AUC 0.5. A clearly
    worse model that is still a valid SavedModel with both signatures."""
    import tensorflow as tf

    def zero(variables: dict) -> None:
        for v in variables.values():
            v.assign(tf.zeros_like(v))

    _copy_with_variables(model_root, dest, zero)
    card = json.loads((dest / "model_card.json").read_text())
    card["model_version"] = version
    card.pop("metrics", None)
    (dest / "model_card.json").write_text(json.dumps(card))


def _nan_known_contracts_copy(model_root: Path, dest: Path) -> None:
    """The exported model with the Contract's wide weights for known values set to NaN: a damaged model that
    returns NaN for every row with a known Contract, and scores an unseen one (index 0). The wide weights,
    not the embedding: the deep tower's ReLU turns a NaN into 0."""
    import tensorflow as tf

    def damage(variables: dict) -> None:
        table = [v for v in variables.values() if v.name.startswith("wide/c__contract/")]
        assert len(table) == 1, [v.name for v in variables.values()]
        known = tf.range(table[0].shape[0]) > 0
        table[0].assign(tf.where(known[:, None], float("nan"), table[0]))

    _copy_with_variables(model_root, dest, damage)


@pytest.mark.slow
def test_end_to_end_gate_and_score_parity(spark, telco_path, tmp_path, conf_dir, monkeypatch):
    """1 epoch on a Telco subset; the gate promotes it, refuses an all-zero model, and `score` on the
    raw rows (without the label column, with a dirty row) gives the evaluation's scores within 1e-5."""
    from downpour.config import load_config
    from downpour.pipelines.ingest import pseudonym
    from downpour.pipelines.score import run_scoring
    from downpour.training.evaluate import run_evaluation
    from downpour.training.registry import Registry
    from downpour.training.train import run_training

    raw = pd.read_csv(telco_path, dtype=str, keep_default_na=False).head(1500)
    data = tmp_path / "telco.csv"
    raw.to_csv(data, index=False)
    out = tmp_path / "out"
    overrides = [
        f"input.path={data}", f"output.path={out}", f"evaluation.registry={tmp_path / 'registry'}",
        "training.epochs=1", "training.workers=1", "shards.row_group_rows=64", "evaluation.baseline=false",
        # the decision's missed cost per row, read from the rebuilt raw rows
        "evaluation.decision.missed_cost_column=MonthlyCharges", "evaluation.decision.action_cost=5",
    ]
    cfg = load_config(conf_dir / "crm_telco.yaml", overrides)
    from downpour.pipelines.prepare import run_prepare

    run_prepare(spark, cfg)
    card = run_training(spark, cfg)
    res = run_evaluation(spark, cfg, gate=True)
    assert res["gate"]["promoted"] and res["model_version"] == card["model_version"]
    assert res["metrics"]["test"]["roc_auc"] > 0.7  # one epoch on real churn data already ranks well
    reg = Registry(tmp_path / "registry")
    assert reg.champion()["model_version"] == card["model_version"]

    # the decision: acting on nothing costs the val churners' MonthlyCharges, summed from the raw table
    # (val rows found by their pseudonymous ids); the threshold is on the card
    decision = res["decision"]
    val_ids = set(pd.read_parquet(Path(res["scores"]) / "split=val")["row_id"])
    raw_val = raw[raw["customerID"].map(lambda c: pseudonym(c, "test-salt")).isin(val_ids)]
    churned = raw_val.loc[raw_val["Churn"] == "Yes", "MonthlyCharges"].astype(float).sum()
    assert len(raw_val) == len(val_ids) > 100
    assert decision["val"]["cost_if_no_action"] == pytest.approx(churned)
    assert decision["threshold"] is not None and decision["val"]["savings"] > 0

    # `score` on raw rows: no label column, plus one row that cannot be parsed
    scoring = raw.drop(columns=["Churn"])
    bad = scoring.iloc[[0]].assign(customerID="BAD-ROW", tenure="twelve")
    scoring = pd.concat([scoring, bad])
    scoring.to_csv(tmp_path / "to_score.csv", index=False)
    counts = run_scoring(spark, cfg, str(tmp_path / "to_score.csv"), str(tmp_path / "scores"),
                         model_dir=str(tmp_path / "registry"))
    assert counts["input"] == 1501 and counts["scored"] == 1500 and counts["quarantined"] == 1
    assert counts["model_version"] == card["model_version"]
    scored = pd.read_parquet(tmp_path / "scores")
    assert list(scored.columns) == ["customerID", "score", "decision", "model_version"]
    bucket = np.floor(scored["score"].astype("float64") * 1e6)  # thresholds are multiples of 1e-6
    assert (scored["decision"] == (bucket >= round(decision["threshold"] * 1e6))).all()
    assert counts["decision"] == {"threshold": decision["threshold"], "acted": int(scored["decision"].sum())}

    # drift: the rows the model was trained on have not drifted; the same rows with MonthlyCharges x3 have
    assert counts["drift"]["drift"] is False, counts["drift"]
    assert counts["drift"]["features"]["MonthlyCharges"] < 0.05 and counts["drift"]["score"] is not None
    shifted = scoring.assign(MonthlyCharges=lambda d: (d["MonthlyCharges"].astype(float) * 3).round(2).astype(str))
    shifted.to_csv(tmp_path / "shifted.csv", index=False)
    # ... scored with reason codes: the features that pushed each score up, named as in the card
    explained_cfg = load_config(conf_dir / "crm_telco.yaml", [*overrides, "scoring.reason_codes.enabled=true"])
    explained = run_scoring(spark, explained_cfg, str(tmp_path / "shifted.csv"), str(tmp_path / "shifted_scores"),
                            model_dir=str(tmp_path / "registry"))
    moved = explained["drift"]
    assert moved["drift"] is True and moved["features"]["MonthlyCharges"] > 0.2
    _check_reason_codes(pd.read_parquet(tmp_path / "shifted_scores"), explained["reason_codes"], card)
    assert any(r.startswith("MonthlyCharges: PSI") for r in moved["reasons"])
    summary = json.loads((tmp_path / "shifted_scores_summary.json").read_text())
    assert summary["drift"]["drift"] is True
    assert not scored["customerID"].isin(raw["customerID"]).any()  # PII ids are hashed
    q = pd.read_parquet(str(tmp_path / "scores") + "_quarantine")
    assert q["reason"].tolist() == ["cast_failed:tenure"] and "churn" not in q.columns

    # rows the model fails on (a non-finite score: here every known Contract, whose wide weights a
    # damaged copy of the model holds as NaN) are quarantined with their raw values, pseudonymised ids and
    # files; a row with an unseen Contract is still scored
    _nan_known_contracts_copy(Path(os.path.realpath(out / "model")), tmp_path / "damaged_model")
    (tmp_path / "to_score_damaged").mkdir()
    scoring.head(20).to_csv(tmp_path / "to_score_damaged" / "part_1.csv", index=False)
    scoring.iloc[[1]].assign(customerID="NEW-CONTRACT", Contract="Lifetime") \
        .to_csv(tmp_path / "to_score_damaged" / "part_2.csv", index=False)
    damaged = run_scoring(spark, cfg, str(tmp_path / "to_score_damaged"), str(tmp_path / "damaged_scores"),
                          model_dir=str(tmp_path / "damaged_model"))
    assert (damaged["input"], damaged["scored"], damaged["quarantined"]) == (21, 1, 20), damaged
    assert pd.read_parquet(tmp_path / "damaged_scores")["customerID"].tolist() == [pseudonym("NEW-CONTRACT",
                                                                                            "test-salt")]
    dq = pd.read_parquet(str(tmp_path / "damaged_scores") + "_quarantine")
    assert set(dq["stage"]) == {"score"} and set(dq["reason"]) == {"model returned a non-finite score"}, dq
    assert all(dq["source_file"].str.endswith("part_1.csv"))
    first20 = scoring.head(20)
    assert sorted(dq["customerid"]) == sorted(pseudonym(c, "test-salt") for c in first20["customerID"])
    assert sorted(dq["monthlycharges"]) == sorted(first20["MonthlyCharges"])  # the raw text, as read
    import dataclasses

    from pyspark.sql import functions as F

    from downpour.pipelines import score as score_mod

    # their raw values come from the input's lineage (not the persisted batch), matched by content: a
    # recomputation that numbers the rows differently (on a cluster the file splits follow the cores
    # registered at the time) still finds each row's own values
    real_ingest = score_mod._ingest

    def renumbered(*args, **kwargs):
        batch = real_ingest(*args, **kwargs)
        return dataclasses.replace(batch, wide=batch.wide.withColumn(score_mod._RID, -F.col(score_mod._RID) - 1))

    with monkeypatch.context() as m:
        m.setattr(score_mod, "_ingest", renumbered)
        again = run_scoring(spark, cfg, str(tmp_path / "to_score_damaged"), str(tmp_path / "damaged_again"),
                            model_dir=str(tmp_path / "damaged_model"))
    assert (again["scored"], again["quarantined"]) == (1, 20)
    dq2 = pd.read_parquet(str(tmp_path / "damaged_again") + "_quarantine")
    assert sorted(zip(dq2["customerid"], dq2["monthlycharges"], strict=True)) == \
        sorted(zip(dq["customerid"], dq["monthlycharges"], strict=True))
    # a row lost on that way (here one dropped on purpose) stops the run instead of shrinking the quarantine
    real_failed_rows = score_mod._failed_rows
    with monkeypatch.context() as m:
        m.setattr(score_mod, "_failed_rows", lambda *a: real_failed_rows(*a).limit(19))
        with pytest.raises(RuntimeError, match="quarantine: 19 rows written, 20 counted"):
            run_scoring(spark, cfg, str(tmp_path / "to_score_damaged"), str(tmp_path / "damaged_lost"),
                        model_dir=str(tmp_path / "damaged_model"))
    # ... and publishes nothing: no scores, no quarantine, no summary, no staging left behind
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("damaged_lost")]
    assert not [p for p in tmp_path.rglob(".staging-*")]
    # a failed run over an earlier run's output leaves that output as it was (scores, quarantine, summary)
    before = _published(tmp_path / "damaged_scores")
    with monkeypatch.context() as m:
        m.setattr(score_mod, "_failed_rows", lambda *a: real_failed_rows(*a).limit(19))
        with pytest.raises(RuntimeError, match="quarantine: 19 rows written"):
            run_scoring(spark, cfg, str(tmp_path / "to_score_damaged"), str(tmp_path / "damaged_scores"),
                        model_dir=str(tmp_path / "damaged_model"))
    assert _published(tmp_path / "damaged_scores") == before

    ev = pd.read_parquet(Path(res["scores"]) / "split=test")
    joined = ev.merge(scored, left_on="row_id", right_on="customerID", suffixes=("_eval", "_score"))
    assert len(joined) == len(ev) > 100
    # rows whose TotalCharges cleaning imputed and flagged are scored with the flag on, as in the shards
    flagged = set(pseudonym(c, "test-salt") for c in raw.loc[raw["TotalCharges"].str.strip() == "", "customerID"])
    assert flagged & set(joined["row_id"]), "the parity check must cover imputed-and-flagged rows"
    np.testing.assert_allclose(joined["score_score"], joined["score_eval"], atol=1e-5)

    # a clearly worse model (all weights zero) is refused; the champion stays
    published = Path(os.path.realpath(out / "model"))
    _zero_weights_copy(published, tmp_path / "zero_model", "zero-weights")
    link = out / "model"
    if link.is_symlink():
        link.unlink()
    else:
        import shutil

        shutil.rmtree(link)
    link.symlink_to(tmp_path / "zero_model")
    with pytest.raises(GateRefused, match="zero-weights"):
        run_evaluation(spark, cfg, gate=True)
    assert reg.champion()["model_version"] == card["model_version"]
    refused = json.loads((out / "model" / "model_card.json").read_text())["evaluation"]["gate"]
    assert refused["compared_on"].startswith("test shards") and refused["value"] == 0.5

    # a champion fitted on other features is compared on the raw test rows, rebuilt by the prepare
    # functions and scored by both models' serving_default: it must find the very same test split
    state = reg.root / reg.champion()["path"] / "feature_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "fitted_rows": -1}))
    with pytest.raises(GateRefused):
        run_evaluation(spark, cfg, gate=True)
    raw_gate = json.loads((out / "model" / "model_card.json").read_text())["evaluation"]["gate"]
    assert raw_gate["compared_on"].startswith("raw test rows")
    assert raw_gate["champion_value"] == pytest.approx(res["metrics"]["test"]["roc_auc"], abs=1e-4)
    assert raw_gate["value"] == pytest.approx(0.5)


def _published(scores: Path) -> tuple:
    """What a reader of a scoring run's outputs sees: the scores' files, the quarantine's rows, the summary."""
    files = sorted(p.name for p in scores.iterdir())
    quarantine = pd.read_parquet(f"{scores}_quarantine").sort_values("customerid").astype(str).to_dict("records")
    return files, quarantine, Path(f"{scores}_summary.json").read_text()


def _check_reason_codes(scored: pd.DataFrame, summary: dict, card: dict) -> None:
    """Reason columns hold feature names of the card, strictly positive and descending contributions,
    and the batch's attributions add up to score - baseline score within the warning line."""
    k = summary["top_k"]
    assert k == 3 and summary["steps"] == 16
    assert [c for c in scored.columns if c.startswith("reason_")] == [
        c for i in range(1, k + 1) for c in (f"reason_{i}", f"reason_{i}_contribution")]
    features = set(card["explain"]["features"])
    assert {"MonthlyCharges", "tenure", "Contract"} <= features
    assert summary["baseline_score"] == card["explain"]["baseline_score"]
    assert 0 <= summary["max_completeness_gap"] < 0.05 and summary["unexplained_rows"] == 0
    names = scored[[f"reason_{i}" for i in range(1, k + 1)]]
    values = scored[[f"reason_{i}_contribution" for i in range(1, k + 1)]].to_numpy()
    assert set(names.stack()) <= features and names["reason_1"].notna().mean() > 0.5
    assert (names.isna().to_numpy() == np.isnan(values)).all()
    assert (values[~np.isnan(values)] > 0).all()
    assert (np.nan_to_num(values[:, :-1], nan=0) >= np.nan_to_num(values[:, 1:], nan=0)).all()
    # a row above the baseline score has at least one reason; one below it may have none
    above = scored["score"] > summary["baseline_score"] + 0.01
    assert names.loc[above, "reason_1"].notna().all()


# ---- worker logs -------------------------------------------------------------------------------------

_BANNERS = ("oneDNN custom operations", "cpu_feature_guard")


def _load_in_a_fresh_process(model_dir: Path, level: str | None) -> str:
    """stderr of a new Python process that loads the model as a scoring worker does (``load_signature``)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = level
    code = ("import sys; from downpour.pipelines.serving import load_signature; "
            "fn, specs = load_signature(sys.argv[1], 'serve_features'); assert specs")
    proc = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_a_scoring_worker_prints_no_tensorflow_banner(tmp_path):
    """Every Python worker that scores loads TensorFlow, whose INFO banners (oneDNN, CPU features) would
    repeat in the logs once per worker; loading a model silences them unless the user sets
    TF_CPP_MIN_LOG_LEVEL. With it at 0 they show: the check sees them when they are there."""
    w, tables = _true_coefficients()
    model_dir = _save_model(tmp_path, "m-logs", w, tables, "dv") / "saved_model"
    quiet = _load_in_a_fresh_process(model_dir, None)
    assert not [b for b in _BANNERS if b in quiet], quiet[-2000:]
    loud = _load_in_a_fresh_process(model_dir, "0")
    assert any(b in loud for b in _BANNERS), loud[-2000:]
