"""Companions of the README's Guarantees: each test breaks one mechanism on purpose and shows that the
guarantee's checker (or test) catches it. A guarantee whose break nothing catches is not one.

Each break is a monkeypatch of the one function that keeps the promise; the assertion is that the run
fails loudly, or that the same scan the guarantee's own test uses finds the leak.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from pyspark.sql import Column
from pyspark.sql import functions as F

from downpour.config import config_from_dict
from downpour.pipelines import clean, ingest
from downpour.pipelines.ingest import REASON, contract_errors, list_input_files
from downpour.pipelines.prepare import account, run_prepare
from downpour.pipelines.rows import tagged_rows

HEADER = ["id", "ts", "amount", "country", "customer_name", "email", "label"]
PII = {"customer_name", "email"}


def _cfg(src: Path, out: Path) -> Any:
    return config_from_dict({
        "name": "breaks",
        "input": {"path": str(src), "format": "csv", "options": {"header": True}},
        "schema": {"id": "string", "ts": "timestamp", "amount": "double", "country": "string",
                   "customer_name": "string", "email": "string", "label": "int"},
        "id_column": "id",
        "timestamp_column": "ts",
        "label": {"column": "label", "positive": 1},
        "pii": {"drop": ["customer_name", "email"], "hash": ["id"]},
        "split": {"method": "hash", "fractions": {"train": 0.6, "val": 0.2, "test": 0.2}},
        "features": {"numeric": ["amount"], "categorical": ["country"]},
        "shards": {"row_group_rows": 16, "min_row_groups_per_worker": 1},
        "training": {"workers": 1},
        "output": {"path": str(out)},
    })


def _rows(n: int = 40) -> list[list[str]]:
    return [[f"id{i:03d}", f"2024-01-{1 + i % 28:02d} 10:00:00", f"{10 + i}.5", ["US", "GB", "FR"][i % 3],
             f"Person Number{i:03d}", f"person{i:03d}@example.com", str(int(i % 5 == 0))] for i in range(n)]


def _shifted(rows: list[list[str]]) -> list[str]:
    """Lines in which each PII value sits in every other column's slot (extra or missing fields)."""
    out, k = [], 0
    for col in PII:
        p = HEADER.index(col)
        for j in range(len(HEADER)):
            if j == p:
                continue
            t = list(rows[k % len(rows)])
            k += 1
            t = t[:p] + ["x"] * (j - p) + t[p:] if j > p else t[:j] + t[p:]
            out.append(",".join(t))
    return out


@pytest.fixture
def shifted_input(tmp_path: Path) -> tuple[Path, set[str]]:
    rows = _rows()
    src = tmp_path / "in" / "credit.csv"
    src.parent.mkdir()
    with src.open("w", newline="") as fh:
        csv.writer(fh).writerows([HEADER, *rows])
    with src.open("a") as fh:
        fh.write("\n".join(_shifted(rows)) + "\n")
    needles = {r[HEADER.index(c)] for r in rows for c in PII} | {r[0] for r in rows}
    return src, needles


def _leaks(out: Path, needles: set[str]) -> list[str]:
    """Every output file's bytes and decoded Parquet values, searched for every raw PII value."""
    found = []
    for p in (q for q in out.rglob("*") if q.is_file() and not q.is_symlink()):
        texts = [p.read_bytes().decode("latin-1")]
        if p.suffix == ".parquet":
            texts.append(json.dumps(pq.read_table(p).to_pylist(), default=str))
        found += [f"{p.relative_to(out)}: {n}" for n in needles for t in texts if n in t]
    return found


# ---- PII never reaches an output through a shifted column ---------------------------------------------
def test_shifted_pii_reaches_no_output(spark, tmp_path, shifted_input):
    src, needles = shifted_input
    m = run_prepare(spark, _cfg(src, tmp_path / "out"))
    assert m["quarantine_reasons"].get("malformed") == len(_shifted(_rows()))
    assert not _leaks(tmp_path / "out", needles)


def test_break_shift_safety_and_the_scan_finds_pii(spark, tmp_path, shifted_input, monkeypatch):
    src, needles = shifted_input
    monkeypatch.setattr(ingest, "shift_safe", lambda raw_text, malformed, keep_line: raw_text)
    run_prepare(spark, _cfg(src, tmp_path / "out"))
    leaks = _leaks(tmp_path / "out", needles)
    assert leaks and all("/quarantine/" in leak for leak in leaks), leaks[:5]  # only the quarantine leaks


# ---- row accounting against an independent count ------------------------------------------------------
def test_break_tagging_to_lose_rows_and_accounting_fails(spark, tmp_path, shifted_input, monkeypatch):
    src, _ = shifted_input
    cfg = _cfg(src, tmp_path / "out")
    real = clean.tag_rows

    def loses_malformed(df, *a):  # a tagging bug that silently drops the lines it cannot parse
        return real(df, *a).where(F.col(REASON).isNull() | (F.col(REASON) != "malformed"))

    monkeypatch.setattr(clean, "tag_rows", loses_malformed)
    files = list_input_files(spark, cfg.input.path)
    with contract_errors(cfg):
        tagged = tagged_rows(spark, cfg, files, clean.resolve_salt(cfg))
        with pytest.raises(RuntimeError, match=r"the input files hold 52 records, the run accounts for 40"):
            account(spark, cfg, files, tagged)


def test_break_the_quarantine_writer_and_prepare_fails(spark, tmp_path, shifted_input, monkeypatch):
    src, _ = shifted_input
    real = clean.quarantine_frame
    monkeypatch.setattr(clean, "quarantine_frame", lambda *a, **k: real(*a, **k).limit(3))
    with pytest.raises(RuntimeError, match="quarantine: 3 rows written, 12 counted"):
        run_prepare(spark, _cfg(src, tmp_path / "out"))
    assert not (tmp_path / "out" / "prepared").exists()  # nothing published


# ---- pseudonyms are HMAC-SHA256 --------------------------------------------------------------------------
VALUES = ["C0001", "", "Zoë Ångström", "a" * 300, "line\nbreak", "🙂"]
SALTS = ["s", "x" * 64, "y" * 65, "sålt with spaces and ünïcode" * 4]


def _spark_pseudonyms(spark, salt: str, hash_fn) -> list[str]:
    df = spark.createDataFrame([(v,) for v in VALUES], "v string")
    return [r[0] for r in df.select(hash_fn(F.col("v"), salt)).collect()]


def test_pseudonyms_are_hmac_sha256_for_any_value_and_salt(spark):
    for salt in SALTS:
        expected = [hmac.new(salt.encode(), v.encode(), hashlib.sha256).hexdigest() for v in VALUES]
        assert _spark_pseudonyms(spark, salt, ingest.salted_hash) == expected
        assert [ingest.pseudonym(v, salt) for v in VALUES] == expected


def test_break_the_pseudonym_and_the_hmac_check_fails(spark):
    def old_sha2(col: Column, salt: str) -> Column:  # the replaced sha2(salt || value)
        return F.sha2(F.concat(F.lit(salt), col), 256)

    salt = SALTS[0]
    expected = [hmac.new(salt.encode(), v.encode(), hashlib.sha256).hexdigest() for v in VALUES]
    assert _spark_pseudonyms(spark, salt, old_sha2) != expected


# ---- atomic pointer swap --------------------------------------------------------------------------------
def test_break_the_atomic_write_and_the_concurrent_reader_sees_it(tmp_path, monkeypatch):
    import test_report_registry as trr

    from downpour.training import registry as R

    def in_place(path: Path, obj: Any) -> None:  # truncate-and-write: what atomic replace prevents
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as fh:
            text = json.dumps(obj)
            fh.write(text[: len(text) // 2])
            fh.flush()
            fh.write(text[len(text) // 2:])

    monkeypatch.setattr(R, "write_json_atomic", in_place)
    with pytest.raises(AssertionError):
        trr.test_pointer_swap_is_atomic_under_concurrent_reads(tmp_path)


# ---- unreadable input is exit 3 naming the file ----------------------------------------------------------
def test_break_the_column_contract_and_the_exit_3_test_fails(spark, tmp_path, capsys, monkeypatch):
    import test_prepare

    monkeypatch.setattr(ingest, "_check_columns", lambda *a, **k: None)
    with pytest.raises(AssertionError):
        test_prepare.test_cli_exit_code_3_names_missing_column_and_file(spark, tmp_path, capsys)


# ---- config errors name the key ---------------------------------------------------------------------------
def test_break_error_formatting_and_the_key_path_test_fails(conf_dir, monkeypatch):
    import test_config

    from downpour import config

    monkeypatch.setattr(config, "_format_error", lambda err: "the config is invalid")
    with pytest.raises(AssertionError):
        test_config.test_errors_name_the_key(conf_dir, ["training.workers=0"], "training.workers")


# ---- only SavedModels are loaded --------------------------------------------------------------------------
def test_break_the_loader_into_unpickling_and_the_marker_test_fails(tmp_path, monkeypatch):
    import pickle

    import tensorflow as tf
    import test_hostile_input

    def unpickling_load(path, *a, **k):  # what a pickle- or HDF5-based loader would do
        with open(Path(path) / "model.pkl", "rb") as fh:
            pickle.load(fh)  # noqa: S301 - the point: this is what the guarantee forbids
        raise ValueError("not a SavedModel")

    monkeypatch.setattr(tf.saved_model, "load", unpickling_load)
    with pytest.raises(AssertionError):
        test_hostile_input.test_model_dir_that_is_not_a_savedmodel_is_refused_and_never_unpickled(
            "garbage_pb", tmp_path)


# ---- deterministic shards: the footer is made canonical ---------------------------------------------------
def test_break_footer_canonicalization_and_the_byte_identity_test_fails(tmp_path, monkeypatch):
    import test_parquet_footer as tpf

    monkeypatch.setattr(tpf, "canonicalize", lambda data: data)  # the JVM's order is kept as written
    with pytest.raises(AssertionError):
        tpf.test_encodings_order_is_made_canonical_and_byte_identical("pyarrow", None, tmp_path)


def test_break_the_logit_path_and_the_order_test_fails(tmp_path, monkeypatch):
    """Export recovers the logit from the clipped float32 probability again (the old floor at 1e-7):
    the served scores tie, and the order test fails."""
    import tensorflow as tf
    import test_served_scores

    from downpour.training import model as model_mod

    real = model_mod.logit_model

    def from_clipped_probability(model: Any) -> Any:
        logits = real(model)

        def call(cols: Any, training: bool = False) -> Any:
            p = tf.clip_by_value(tf.sigmoid(logits(cols, training=training)), 1e-7, 1 - 1e-7)
            return tf.math.log(p) - tf.math.log1p(-p)

        return call

    monkeypatch.setattr(model_mod, "logit_model", from_clipped_probability)
    with pytest.raises(AssertionError):
        test_served_scores.test_served_scores_keep_the_order_of_very_negative_logits(tmp_path)
