"""features/drift.py: the reference fitted on train, PSI and unseen shares of a batch, the drift flag."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from downpour.columns import internal_names
from downpour.config import config_from_dict
from downpour.features import drift as D


def _cfg(country: object = "country"):
    return config_from_dict({
        "name": "drift", "input": {"path": "/nowhere"}, "output": {"path": "/nowhere"},
        "schema": {"id": "string", "amount": "double", "country": "string", "merchant": "string", "y": "int"},
        "id_column": "id", "label": {"column": "y", "positive": 1},
        "features": {"numeric": ["amount"],
                     "categorical": [country, {"column": "merchant", "encoding": "hash", "buckets": 64}]},
    })


def _frame(spark, n: int, seed: int, scale: float = 1.0, countries=("de", "fr", "nl")):
    rng = np.random.default_rng(seed)
    pdf = pd.DataFrame({"amount": rng.lognormal(3, 1, n) * scale,
                        "country": rng.choice(list(countries), n),
                        "merchant": [f"m{i}" for i in rng.integers(0, 5000, n)]})
    pdf.loc[rng.random(n) < 0.05, "amount"] = None  # nulls are a bin of their own
    names = internal_names(list(_cfg().schema_))
    return spark.createDataFrame(pdf.rename(columns=names)), names


def test_psi_is_the_textbook_formula():
    assert D.psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    expected = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert D.psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(expected)
    assert D.psi([0.5, 0.5, 0.0], [0.5, 0.5, 0.0]) == 0.0  # empty bins are floored, not a division by zero


def test_the_same_distribution_does_not_drift_and_a_shifted_one_does(spark):
    cfg = _cfg()
    train, names = _frame(spark, 20000, 1)
    ref = D.fit_reference(train, cfg)
    amount = ref["numeric"]["amount"]
    assert len(amount["edges"]) == D.BINS - 1 and sum(amount["shares"]) == pytest.approx(1.0)
    assert amount["shares"][-1] == pytest.approx(0.05, abs=0.01)  # the null bin
    assert ref["categorical"] == {"country": {"values": ["de", "fr", "nl"]}}  # the hashed column is not checked

    same, _ = _frame(spark, 5000, 2)
    ok = D.judge(D.profile(same, ref, names), psi_threshold=0.2, unseen_threshold=0.05)
    assert not ok["drift"] and ok["features"]["amount"] < 0.02 and ok["unseen"]["country"] == 0.0

    shifted, _ = _frame(spark, 5000, 3, scale=3.0)  # amounts x3
    bad = D.judge(D.profile(shifted, ref, names), psi_threshold=0.2, unseen_threshold=0.05)
    assert bad["drift"] and bad["features"]["amount"] > 0.2
    assert bad["reasons"] == [f"amount: PSI {bad['features']['amount']:.3f} > 0.2"]


def test_unseen_categories_flag_drift(spark):
    cfg = _cfg()
    train, names = _frame(spark, 5000, 1)
    ref = D.fit_reference(train, cfg)
    new, _ = _frame(spark, 2000, 4, countries=("de", "fr", "nl", "xx"))
    out = D.judge(D.profile(new, ref, names), psi_threshold=0.2, unseen_threshold=0.05)
    assert out["unseen"]["country"] == pytest.approx(0.25, abs=0.03) and out["drift"]
    assert any(r.startswith("country:") for r in out["reasons"])


def test_score_psi_against_its_own_reference(spark):
    rng = np.random.default_rng(5)
    val = spark.createDataFrame(pd.DataFrame({"score": rng.beta(1, 8, 5000)}))
    ref = D.numeric_reference(val, {"score": val["score"]})["score"]
    same = spark.createDataFrame(pd.DataFrame({"score": rng.beta(1, 8, 5000)}))
    higher = spark.createDataFrame(pd.DataFrame({"score": rng.beta(2, 4, 5000)}))
    assert D.profile(same, {}, {}, score=same["score"], score_ref=ref)["score"] < 0.02
    assert D.profile(higher, {}, {}, score=higher["score"], score_ref=ref)["score"] > 0.5


def test_the_reference_keeps_only_the_vocabulary(spark):
    """Values rarer than the column's min_count are out of the model's vocabulary: not in the reference
    (so not in the card), and unseen when they come back."""
    cfg = _cfg({"column": "country", "min_count": 10})
    train, names = _frame(spark, 2000, 1)
    rare = spark.createDataFrame(pd.DataFrame({"amount": [1.0] * 3, "country": ["lu"] * 3, "merchant": ["m1"] * 3})
                                 .rename(columns=names))
    ref = D.fit_reference(train.unionByName(rare), cfg)
    assert ref["categorical"]["country"]["values"] == ["de", "fr", "nl"]
    assert D.profile(rare, ref, names)["unseen"]["country"] == 1.0


def test_the_reference_read_from_a_shared_quantile_table_is_the_one_it_computes(spark):
    """fit_reference given prepare's exact quantile table (by internal column name) gives the reference it
    computes on its own; the companion: doctored deciles in the table become its edges."""
    from downpour.features import exact

    cfg = _cfg()
    df, names = _frame(spark, 3000, seed=3)
    wanted = D.quantiles_wanted(cfg)
    assert wanted == {names["amount"]: D.DECILES}
    known = exact.table(df, wanted)
    alone = D.fit_reference(df, cfg)
    assert D.fit_reference(df, cfg, known) == alone
    doctored = {c: {p: v + 1.0 for p, v in q.items()} for c, q in known.items()}
    edges = D.fit_reference(df, cfg, doctored)["numeric"]["amount"]["edges"]
    assert edges == [e + 1.0 for e in alone["numeric"]["amount"]["edges"]]
