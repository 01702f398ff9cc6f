"""Hostile input: fuzzed CSV / JSON through ingest + clean, and the CLI's answer to unreadable input.

Property: whatever bytes arrive, ingest + clean either accounts for every row (input == clean +
quarantined + duplicates, and the clean / quarantine frames materialise with exactly those counts) or
raises ``DataContractError``; never anything else. The CLI turns the unrecoverable cases into exit 3
with one line naming the file and the problem, and no traceback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from downpour.config import Config, config_from_dict
from downpour.errors import DataContractError
from downpour.pipelines import clean
from downpour.pipelines.ingest import contract_errors, list_input_files
from downpour.pipelines.prepare import account
from downpour.pipelines.rows import split_rows, tagged_rows

ROOT = Path(__file__).resolve().parents[1]
HEADER = ["id", "ts", "amount", "country", "email", "label"]
SCHEMA = {"id": "string", "ts": "timestamp", "amount": "double", "country": "string", "email": "string",
          "label": "int"}
FUZZ = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

_CASES: dict[str, int] = {}


_DIRS: list[Path] = []  # where _write puts each case's input: under pytest's own temporary directory


@pytest.fixture(scope="module", autouse=True)
def _case_summary(tmp_path_factory):
    """Print how many hostile cases ran (never written into the tree: a test must not edit tracked files).
    Each case's input goes under pytest's temporary directory, which pytest prunes, not loose in /tmp."""
    _DIRS.append(tmp_path_factory.mktemp("hostile"))
    yield
    _DIRS.clear()
    total = sum(_CASES.values())
    print(f"\nhostile input: {total} cases {dict(sorted(_CASES.items()))}")


def _count(name: str) -> None:
    _CASES[name] = _CASES.get(name, 0) + 1


def raw_cfg(input_path: Path, fmt: str = "csv", **input_extra: Any) -> dict[str, Any]:
    """The config as the YAML a user would write."""
    return {
        "name": "hostile",
        "input": {"path": str(input_path), "format": fmt,
                  "options": {"header": True} if fmt == "csv" else {}, **input_extra},
        "schema": SCHEMA,
        "id_column": "id",
        "timestamp_column": "ts",
        "label": {"column": "label", "positive": 1},
        "pii": {"drop": ["email"], "hash": ["id"]},
        "cleaning": {"nulls": {"amount": {"action": "impute", "statistic": "median", "flag": True}},
                     "ranges": {"amount": {"min": 0, "max": 1e12}},
                     "domains": {"label": [0, 1]}},
        "features": {"numeric": ["amount"], "categorical": ["country"]},
        "output": {"path": str(input_path.parent / "out")},
    }


def make_cfg(input_path: Path, fmt: str = "csv", **input_extra: Any) -> Config:
    return config_from_dict(raw_cfg(input_path, fmt, **input_extra))


def ingest_outcome(spark, cfg: Config) -> dict[str, Any] | str:
    """Ingest + clean + count, and materialise both outputs; the message when a DataContractError was
    raised."""
    try:
        files = list_input_files(spark, cfg.input.path)
        with contract_errors(cfg):
            tagged = tagged_rows(spark, cfg, files, clean.resolve_salt(cfg)).cache()
            try:
                outcome, _ = account(spark, cfg, files, tagged)  # raises if the counts disagree
                split_df, _, _ = split_rows(tagged, cfg)
                outcome["clean_rows"] = split_df.count()
                outcome["quarantine_rows"] = clean.quarantine_frame(tagged, cfg, "v").count()
            finally:
                tagged.unpersist()
    except DataContractError as exc:
        assert str(exc), "a DataContractError must say what is wrong"
        return str(exc)
    counts = outcome["counts"]
    assert counts["input"] == counts["clean"] + counts["quarantined"] + counts["duplicates"]
    assert outcome["clean_rows"] == counts["clean"]
    assert outcome["quarantine_rows"] == counts["quarantined"]
    return outcome


# ---- strategies -------------------------------------------------------------------------------------
_HOSTILE_TEXT = st.sampled_from([
    "NaN", "nan", "Infinity", "-Infinity", "inf", "-inf", "1e309", "-1e309", "9" * 400, "1e-400",
    "0x1F", "1,5", "", " ", "\u00a0", "null", "NULL", "None", "true", "\ufeff7", "٣", "1_000",
    "2024-13-45 99:99:99", "0000-00-00", "9999999-01-01", "1970-01-01 00:00:00", "2024-01-01T10:00:00Z",
])
_CELL = st.one_of(
    _HOSTILE_TEXT,
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
_GOOD_ROW = st.tuples(
    st.text(alphabet="abcdef0123456789", min_size=1, max_size=4),
    st.sampled_from(["2024-01-01 10:00:00", "2024-02-03 04:05:06"]),
    st.sampled_from(["1.5", "20", "300.25"]),
    st.sampled_from(["US", "GB"]),
    st.just("x@example.com"),
    st.sampled_from(["0", "1"]),
).map(list)


def _line(cells: list[str]) -> bytes:
    return ",".join(cells).encode("utf-8", "surrogatepass")


@st.composite
def hostile_csv(draw) -> bytes:
    """A header (usually right) plus lines that are well formed, hostile in one cell, of the wrong width,
    badly quoted or not UTF-8 at all."""
    header = draw(st.sampled_from([HEADER, HEADER, HEADER, list(reversed(HEADER)), HEADER[:-1],
                                   [*HEADER, "extra"], [h.upper() for h in HEADER]]))
    lines = [",".join(header).encode()]
    for _ in range(draw(st.integers(min_value=0, max_value=12))):
        row = draw(_GOOD_ROW)
        kind = draw(st.sampled_from(["good", "cell", "cell", "short", "long", "quote", "bytes", "blank"]))
        if kind == "cell":
            row[draw(st.integers(0, len(row) - 1))] = draw(_CELL).replace("\n", " ").replace("\r", " ")
            lines.append(_line(row))
        elif kind == "short":
            lines.append(_line(row[:draw(st.integers(0, len(row) - 1))]))
        elif kind == "long":
            lines.append(_line(row + draw(st.lists(_HOSTILE_TEXT, min_size=1, max_size=3))))
        elif kind == "quote":
            i = draw(st.integers(0, len(row) - 1))
            row[i] = draw(st.sampled_from(['"unterminated', 'a"b', '"x""', '""', '"a,b"', '"multi\nline"']))
            lines.append(_line(row))
        elif kind == "bytes":
            i = draw(st.integers(0, len(row) - 1))
            cells = [c.encode() for c in row]
            cells[i] = draw(st.binary(min_size=1, max_size=8).filter(lambda b: b"\n" not in b and b"\r" not in b))
            lines.append(b",".join(cells))
        elif kind == "blank":
            lines.append(b"")
        else:
            lines.append(_line(row))
    ending = draw(st.sampled_from([b"\n", b"\r\n"]))
    return ending.join(lines) + draw(st.sampled_from([b"", ending]))


_JSON_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**40), max_value=10**40),
              st.floats(allow_nan=False, allow_infinity=False), _HOSTILE_TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["a", "b"]), inner,
                                                                         max_size=2)),
    max_leaves=4,
)


@st.composite
def hostile_json(draw) -> bytes:
    """JSON lines: good records, records with hostile or nested values, missing / extra keys, NaN
    literals, truncated records, non-objects and raw bytes."""
    lines: list[bytes] = []
    for _ in range(draw(st.integers(min_value=0, max_value=10))):
        row = dict(zip(HEADER, draw(_GOOD_ROW), strict=True))
        kind = draw(st.sampled_from(["good", "value", "value", "missing", "extra", "nan", "truncated",
                                     "scalar", "bytes", "array", "blank"]))
        if kind == "value":
            row[draw(st.sampled_from(HEADER))] = draw(_JSON_VALUE)
        elif kind == "missing":
            row.pop(draw(st.sampled_from(HEADER)))
        elif kind == "extra":
            row["surprise"] = draw(_JSON_VALUE)
        text = json.dumps(row)
        if kind == "nan":
            text = text.replace('"1.5"', "NaN").replace('"20"', "Infinity").replace('"300.25"', "-Infinity")
        elif kind == "truncated":
            text = text[:draw(st.integers(1, len(text) - 1))]
        elif kind == "scalar":
            text = json.dumps(draw(_JSON_VALUE))
        elif kind == "array":  # zero, one or several whole records on one line
            text = json.dumps([row] * draw(st.integers(0, 3)))
        elif kind == "blank":
            text = draw(st.sampled_from(["", " ", "\t "]))
        lines.append(draw(st.binary(min_size=1, max_size=12)) if kind == "bytes" else text.encode())
    return b"\n".join(lines)


def _oracle_records(data: bytes, header: bool, blank: bytes = bytes(range(0x21))) -> int:
    """Records in ``data`` by the reader's rules, computed from the bytes alone: lines end at \\n, \\r\\n
    or \\r; a line with no byte outside ``blank`` is no record; with a header, the first record is it."""
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    n = sum(1 for ln in lines if ln.strip(blank))
    return max(0, n - 1) if header else n


def _write(data: bytes, name: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="case-", dir=_DIRS[-1]))
    path = d / "in" / name
    path.parent.mkdir()
    path.write_bytes(data)
    return path


# ---- properties -------------------------------------------------------------------------------------
@pytest.mark.slow
@FUZZ
@given(data=hostile_csv())
def test_fuzzed_csv_is_accounted_for_or_a_contract_error(spark, data):
    _count("csv")
    path = _write(data, "t.csv")
    outcome = ingest_outcome(spark, make_cfg(path.parent))
    header_ok = data.split(b"\n", 1)[0].rstrip(b"\r") == ",".join(HEADER).encode()
    if header_ok and isinstance(outcome, str):
        # The declared header is always readable; only no data rows at all, or the median of a column
        # with no usable value in the train split, can fail.
        assert "cannot impute the median" in outcome or "no data rows" in outcome, outcome
    if isinstance(outcome, dict):
        # An oracle that shares no code with the pipeline: every data line with a visible character is
        # one record, quoted or not (multiLine is off, so a quote never joins lines).
        assert outcome["counts"]["input"] == _oracle_records(data, header=True)


@pytest.mark.slow
@FUZZ
@given(data=hostile_json(), extra_ok=st.booleans())
def test_fuzzed_json_is_accounted_for_or_a_contract_error(spark, data, extra_ok):
    _count("json")
    path = _write(data, "t.json")
    outcome = ingest_outcome(spark, make_cfg(path.parent, fmt="json", allow_extra_columns=extra_ok))
    if isinstance(outcome, dict):
        assert outcome["counts"]["input"] == _oracle_records(data, header=False, blank=b" \t\r\n")
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        arrays = sum(1 for ln in lines if ln.lstrip(b" \t").startswith(b"["))
        assert outcome["quarantine_reasons"].get("json_array", 0) == arrays


@pytest.mark.slow
@FUZZ
@given(cells=st.lists(_HOSTILE_TEXT, min_size=1, max_size=8))
def test_hostile_amounts_are_quarantined_or_imputed_never_clean_garbage(spark, cells):
    """NaN / Inf / huge / unparseable amounts never reach the clean rows as non-finite numbers."""
    _count("amount")
    rows = [[f"r{i}", "2024-01-01 10:00:00", v, "US", "x@example.com", "0"] for i, v in enumerate(cells)]
    path = _write("\n".join(",".join(r) for r in [HEADER, *rows]).encode() + b"\n", "t.csv")
    cfg = make_cfg(path.parent)
    files = list_input_files(spark, cfg.input.path)
    tagged = tagged_rows(spark, cfg, files, clean.resolve_salt(cfg))
    try:
        split_df, _, _ = split_rows(tagged, cfg)
    except DataContractError as exc:  # no usable amount in train: the median cannot be imputed
        assert "amount" in str(exc)
        return
    got = split_df.select("amount").collect()
    for (v,) in got:
        assert v is not None and v == v and abs(v) <= 1e12, f"clean amount {v!r}"


# ---- unrecoverable inputs, one at a time --------------------------------------------------------------
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00\x1f\xf3\xffa"
UNRECOVERABLE = {
    "empty": (b"", "csv", "empty"),
    "header_only": ((",".join(HEADER) + "\n").encode(), "csv", "no data rows|the column has no values"),
    "png": (PNG + bytes(range(256)), "csv", "missing"),
    "missing_column": (b"id,ts,amount\n1,2024-01-01 10:00:00,3\n", "csv", "'country' is missing"),
    "json_all_broken": (b"{not json\n\x00\x01\x02\n[1, 2\n", "json", ""),
}


@pytest.mark.parametrize("case", ["empty", "header_only", "png", "missing_column", "json_all_broken"])
def test_unrecoverable_input_is_a_contract_error_in_process(spark, case):
    _count("unrecoverable")
    data, fmt, _ = UNRECOVERABLE[case]
    path = _write(data, f"t.{fmt}")
    outcome = ingest_outcome(spark, make_cfg(path.parent, fmt=fmt))
    if case == "header_only":
        assert isinstance(outcome, str) and "no data rows" in outcome
    else:
        assert isinstance(outcome, str)


@pytest.mark.slow  # one JVM per case; "missing_column" is also covered by test_prepare.py
@pytest.mark.parametrize("case", ["header_only", "png"])
def test_cli_prepare_exits_3_naming_file_and_problem(case, tmp_path):
    _count("cli")
    data, fmt, problem = UNRECOVERABLE[case]
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / f"t.{fmt}").write_bytes(data)
    (tmp_path / "conf.yaml").write_text(yaml.safe_dump(raw_cfg(inp, fmt=fmt)))
    env = {**os.environ, "DOWNPOUR_PII_SALT": "cli-salt"}
    proc = subprocess.run([sys.executable, "-m", "downpour", "prepare", "--conf", str(tmp_path / "conf.yaml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    last = [ln for ln in proc.stderr.splitlines() if ln.startswith("downpour prepare:")]
    assert last, proc.stderr[-2000:]
    assert str(inp) in last[-1], last[-1]
    assert re.search(problem, last[-1]), last[-1]



# ---- hostile model directories: only a SavedModel is ever loaded ------------------------------------
class _Payload:
    """Unpickling this would create a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("case", ["pickle_only", "garbage_pb"])
def test_model_dir_that_is_not_a_savedmodel_is_refused_and_never_unpickled(case, tmp_path):
    import pickle

    from downpour.pipelines.serving import load_signature

    _count("model")
    model = tmp_path / "model"
    model.mkdir()
    marker = tmp_path / "executed"
    for name in ("model.pkl", "keras_metadata.pb", "model.h5"):
        (model / name).write_bytes(pickle.dumps(_Payload(marker)))
    if case == "garbage_pb":
        (model / "saved_model.pb").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(DataContractError, match=re.escape(str(model))):
        load_signature(str(model), "serving_default")
    assert not marker.exists()
