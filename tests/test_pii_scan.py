"""No PII anywhere: run prepare -> train -> evaluate -> score on tiny synthetic fraud data, then scan
every output file (Parquet decoded as well as its raw bytes) and every captured log line for the raw
values of the PII columns and for the salt itself."""

from __future__ import annotations

import logging
import re
import uuid
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

PII_COLUMNS = ["card_number", "customer_name", "email", "customer_id"]


def _needles(csv_dir: Path) -> set[str]:
    """Every raw PII value long enough to be unambiguous (short fragments match by chance)."""
    raw = pd.concat(pd.read_csv(p, dtype=str, keep_default_na=False) for p in csv_dir.glob("*.csv"))
    values: set[str] = set()
    for col in PII_COLUMNS:
        values |= {v.strip() for v in raw[col] if len(v.strip()) >= 6}
    return values


def _texts(path: Path) -> list[str]:
    """What a reader of ``path`` could see: its bytes, and for Parquet every decoded value."""
    data = path.read_bytes()
    out = [data.decode("latin-1")]
    if path.suffix == ".parquet" or data[:4] == b"PAR1":
        table = pq.read_table(path)
        out.append("\n".join(str(v) for col in table.columns for v in col.to_pylist()))
        out.append(" ".join(table.column_names))
    return out


@pytest.mark.slow
def test_no_pii_or_salt_in_any_output_or_log(spark, tmp_path, conf_dir, caplog, capfd, monkeypatch):
    from downpour import api
    from downpour.pipelines.generate import generate, write_raw

    salt = f"pii-scan-salt-{uuid.uuid4().hex}"
    monkeypatch.setenv("DOWNPOUR_PII_SALT", salt)
    caplog.set_level(logging.DEBUG, logger="downpour")
    raw_dir = tmp_path / "raw"
    write_raw(generate(spark, "fraud", rows=3000, seed=1, dirty_rate=0.02), str(raw_dir), fmt="csv", partitions=1)
    needles = _needles(raw_dir)
    shifted = write_shifted_pii(raw_dir, raw_dir / "shifted.csv")  # PII values in every other column's slot
    out = tmp_path / "out"
    cfg = api.load(str(conf_dir / "fraud.yaml"), [
        f"input.path={raw_dir}", f"output.path={out}", f"evaluation.registry={out / 'registry'}",
        "training.workers=1", "training.epochs=1", "training.batch_size=256", "shards.row_group_rows=128",
        "scoring.reason_codes.enabled=true",  # reason codes name features, never values
    ])
    api.prepare(cfg, spark=spark)
    api.train(cfg, spark=spark)
    api.evaluate(cfg, spark=spark)
    summary = api.score(cfg, input_url=str(raw_dir), output_url=str(out / "scores"), spark=spark)
    # generated data: the attributions add up, to the loose bound a 16-step path keeps on a trained model
    # (the precise completeness check is tests/test_reason_codes.py)
    assert summary["reason_codes"]["max_completeness_gap"] < 0.05

    assert pd.read_parquet(out / "scores")["reason_1"].notna().any()  # the scan covers real reason names
    assert len(needles) > 200, "the scan must look for real PII values"  # names, emails, card numbers, ids
    pattern = re.compile("|".join(re.escape(n) for n in sorted(needles, key=len, reverse=True)))
    captured = capfd.readouterr()
    logs = "\n".join([caplog.text, captured.out, captured.err])
    assert "prepare:" in caplog.text  # the logs were captured
    sources = {"<logs>": [logs]}
    files = [p for p in out.rglob("*") if p.is_file() and not p.is_symlink()]
    kinds = {p.suffix for p in files}
    assert {".parquet", ".json", ".html"} <= kinds, kinds  # shards / quarantine / scores, manifest, report
    for p in files:
        sources[str(p.relative_to(out))] = _texts(p)
    leaks = []
    for where, texts in sources.items():
        for text in texts:
            m = pattern.search(text)
            if m:
                leaks.append(f"{where}: {m.group(0)!r}")
            if salt in text:
                leaks.append(f"{where}: the salt")
    assert not leaks, leaks[:20]
    # the shifted lines were read, and each one is in the quarantine with where to find it
    quarantine = pd.read_parquet(out / "prepared" / "quarantine")
    from_shifted = quarantine[quarantine["source_file"].str.endswith("shifted.csv")]
    assert len(from_shifted) == shifted and set(from_shifted["reason"]) == {"malformed"}
    assert from_shifted["line_number"].between(2, shifted + 1).all() and from_shifted["line_number"].is_unique


def write_shifted_pii(csv_dir: Path, target: Path) -> int:
    """Lines of the generated rows in which every PII value lands in every other column's slot, as
    an unquoted comma (extra fields before it) or a missing field (fewer) would put it; returns the
    number of lines. Each line has another field count than the header, so the reader sees it as
    malformed, but what each slot holds is the point: the quarantine must not keep any of it."""
    source = next(p for p in sorted(csv_dir.glob("*.csv")))
    raw = pd.read_csv(source, dtype=str, keep_default_na=False)
    header = list(raw.columns)
    lines = [",".join(header)]
    rows = iter(raw.itertuples(index=False))
    for col in PII_COLUMNS:
        p = header.index(col)
        for j in range(len(header)):
            if j == p:
                continue
            tokens = [str(v).replace(",", " ") for v in next(rows)]
            value = tokens[p]
            tokens = tokens[:p] + [""] * (j - p) + tokens[p:] if j > p else tokens[:j] + tokens[p:]
            assert tokens[j] == value and len(tokens) != len(header)
            lines.append(",".join(tokens))
    target.write_text("\n".join(lines) + "\n")
    return len(lines) - 1
