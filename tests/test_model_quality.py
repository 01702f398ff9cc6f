"""The deep model earns its place: on the demo's data (generated fraud, 200k rows, seed 42, 1 % dirty
rows) with the shipped config, its val and test ROC-AUC and PR-AUC are at least the LR baseline's
(within 0.002 and 0.01). Slow (about 6 minutes), because the claim is about the demo users run.

The whole run goes through the product
(generate -> prepare -> train on 2 Horovod workers -> evaluate in Spark), so a change anywhere in it
that makes the model trail its baseline again fails here.
"""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_the_deep_model_is_not_worse_than_its_lr_baseline_on_generated_fraud(spark, tmp_path, conf_dir, monkeypatch):
    from downpour import api
    from downpour.pipelines.generate import generate, write_raw

    monkeypatch.setenv("DOWNPOUR_PII_SALT", "quality-test-salt")
    raw = tmp_path / "raw"
    write_raw(generate(spark, "fraud", rows=200_000, seed=42, dirty_rate=0.01), str(raw), fmt="csv", partitions=2)
    cfg = api.load(str(conf_dir / "fraud.yaml"), [
        f"input.path={raw}", f"output.path={tmp_path / 'out'}", "evaluation.gbt_baseline=false",
    ])
    api.prepare(cfg, spark=spark)
    api.train(cfg, spark=spark)
    result = api.evaluate(cfg, spark=spark)
    for split in ("val", "test"):
        model, baseline = result["metrics"][split], result["baseline"][split]
        assert model["positives"] >= 50, model  # enough positives for the figures to mean something
        assert model["roc_auc"] >= baseline["roc_auc"] - 0.002, (split, model, baseline)
        assert model["pr_auc"] >= baseline["pr_auc"] - 0.01, (split, model, baseline)
