"""How ``make bench`` turns samples into figures, goals and the README table (benchmarks/common.py,
benchmarks/run.py): figures are medians of per-round ratios with their (min, max), every goal is
carried and judged, and the table shows median, spread, date and commit. No timing is asserted."""

from __future__ import annotations

import pytest


def test_a_figure_is_the_median_of_per_round_ratios_with_their_spread() -> None:
    from benchmarks.common import paired_ratios, ratio_figure, summary

    ours, theirs = [10.0, 30.0, 20.0], [5.0, 10.0, 20.0]
    assert paired_ratios(ours, theirs) == [2.0, 3.0, 1.0]
    assert ratio_figure(ours, theirs) == (2.0, [1.0, 3.0])
    with pytest.raises(ValueError):
        paired_ratios([1.0, 2.0], [1.0])
    s = summary([3.4, 1.2, 2.6], 0)
    assert s == {"median": 3, "spread": [1, 3], "samples": [3, 1, 3]}


def test_every_goal_is_carried_and_judged_from_the_figures() -> None:
    from benchmarks import run

    targets = run.goals()
    wanted = {"prepare_vs_bare_io": ("<=", 5), "prepare_no_windows_vs_bare_io": ("<=", 3),
              "score_vs_bare_io": ("<=", 3), "prepare_10x_scaling": ("<=", 11), "score_10x_scaling": ("<=", 11),
              "horovod_2v1_speedup_fixed_threads": (">=", 1.8), "train_vs_in_memory": (">=", 0.9),
              "input_vs_stock_converter": (">=", 10), "peer_kerasestimator_time_ratio": ("<=", 0.5)}
    for key, (op, value) in wanted.items():
        assert targets[key] == {"op": op, "value": value}
    assert "horovod_2v1_speedup_same_machine" not in targets  # reported: not a data-parallel figure
    met = run.goals_met({"train_vs_in_memory": 0.95, "prepare_vs_bare_io": 5.5}, targets)
    assert met["train_vs_in_memory"] is True and met["prepare_vs_bare_io"] is False
    assert met["score_10x_scaling"] is None  # not measured


def test_the_table_shows_median_spread_goal_date_and_commit() -> None:
    from benchmarks import run

    sections = {"training": {"train_vs_in_memory": 0.93, "train_vs_in_memory_spread": [0.9, 0.97],
                             "horovod_2v1_speedup_fixed_threads": 1.2,
                             "horovod_2v1_speedup_fixed_threads_spread": [1.1, 1.3]}}
    figures, spreads = run._figures(sections)
    targets = run.goals()
    result = {"mode": "quick", "finished_at": "2026-12-05T00:00:00+00:00", "commit": "abc123def456",
              "machine": {"gpus": 0}, "gpu": run._gpu({"gpus": 0}), "figures": figures, "spreads": spreads,
              "goals": targets, "goals_met": run.goals_met(figures, targets), "sections": sections}
    md = run.render_markdown(result)
    assert "2026-12-05T00:00:00+00:00" in md and "abc123def456" in md
    assert "no GPU machine was lent to this run" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| `")}
    assert set(rows) == {f"`{k}`" for k in run.GOALS}
    assert "| 0.93 | 0.9 - 0.97 | >= 0.9 | met |" in rows["`train_vs_in_memory`"]
    assert "| 1.2 | 1.1 - 1.3 | >= 1.8 | **missed** |" in rows["`horovod_2v1_speedup_fixed_threads`"]
    assert rows["`score_10x_scaling`"].endswith("| - | - | <= 11 | not measured |")
    assert run._gpu({"gpus": 0}) == {"measured": False, "why": "no GPU machine was lent to this run"}


def test_the_peer_notes_say_what_dominates_each_side() -> None:
    from benchmarks.peer_estimator import _notes, auc_standard_error

    r = {"repeats": 3, "test_rows": 6000, "test_positives": 21, "peer_kerasestimator_auc_delta": -0.01,
         "ours_seconds": {"median": 60.0}, "peer_seconds": {"median": 130.0},
         "ours_breakdown_seconds": {"prepare": 35.0, "train": 20.0, "score": 5.0},
         "peer_breakdown_seconds": {"fit": 40.0, "transform": 90.0},
         "auc_standard_error": {"ours": 0.03, "peer": 0.02}}
    notes = _notes(r)
    assert notes[0].startswith("the peer's time is dominated by its per-row `transform`")
    assert "ours is dominated by `prepare`" in notes[1]
    assert "within two standard errors" in notes[2]
    few, many = auc_standard_error(0.9, 20, 6000), auc_standard_error(0.9, 200, 6000)
    assert few is not None and many is not None and few > many > 0
    assert auc_standard_error(0.9, 0, 100) is None
