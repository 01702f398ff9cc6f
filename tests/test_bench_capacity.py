"""The capacity model's arithmetic (benchmarks/capacity.py): stages charged to the step that submitted
them, projections that scale with rows and cores, and the bottleneck named. No timing is asserted."""

from __future__ import annotations

from benchmarks import capacity


def _stage(at: str, run_ms: int, shuffle: int, tasks: int = 2) -> dict:
    return {"submissionTime": f"2026-12-04T10:00:{at}GMT", "numCompleteTasks": tasks, "executorRunTime": run_ms,
            "inputBytes": 10, "shuffleWriteBytes": shuffle, "outputBytes": 0}


def test_stages_are_charged_to_the_step_whose_window_holds_their_submission():
    t0 = capacity._epoch("2026-12-04T10:00:00.000GMT")
    windows = [("ingest_clean", t0, t0 + 10), ("shards", t0 + 10, t0 + 20)]
    stages = [_stage("01.000", 4000, 100), _stage("09.500", 1000, 0), _stage("12.000", 3000, 50),
              _stage("25.000", 9999, 9999), _stage("30.000", 7, 7)]  # the last two: after the run
    out = capacity.charge(stages, windows, t0, t0 + 21)
    assert out["ingest_clean"]["stages"] == 2 and out["ingest_clean"]["core_s"] == 5.0
    assert out["ingest_clean"]["shuffle_write_bytes"] == 100 and out["ingest_clean"]["tasks"] == 4
    assert out["shards"]["core_s"] == 3.0 and out["shards"]["shuffle_write_bytes"] == 50
    assert "other" not in out  # every stage of the run fell in a step window


def test_projection_scales_with_rows_and_cores_and_names_the_bottleneck():
    a = dict(capacity.ASSUMPTIONS, efficiency=1.0, shuffle_mb_s_per_core=100.0)
    costs = {"windows": {"core_us_per_row": 10.0, "shuffle_bytes_per_row": 100.0},
             "shards": {"core_us_per_row": 2.0, "shuffle_bytes_per_row": 5000.0}}
    p50 = capacity.project(costs, 1_000_000_000, 50, a)
    p200 = capacity.project(costs, 1_000_000_000, 200, a)
    assert p50["steps"]["windows"]["compute_s"] == 200.0  # 1e9 rows x 10 us / 50 cores
    assert p50["steps"]["shards"]["shuffle_s"] == 1000.0  # 5 TB / (50 cores x 100 MB/s)
    assert p50["bottleneck"] == "shards" and p50["wall_s"] == 1200.0
    assert p200["wall_s"] == 300.0 and p200["shuffle_gb"] == p50["shuffle_gb"] == 5100.0


def test_the_check_compares_a_prediction_with_the_other_run():
    run = {"rows": 1_000, "wall_s": 3.0, "steps": {"a": {"core_s": 2.0, "shuffle_write_bytes": 0}}}
    other = {"rows": 10_000, "wall_s": 12.0}
    got = capacity.check(run, other, cores=2)
    assert got["predicted_s"] == 10.0 and got["measured_over_predicted"] == 1.2
