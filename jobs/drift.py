"""The drift check of a scoring run: did the batch drift from the model's training data?

    python jobs/drift.py --output <scores URL> [--json]

Reads ``<scores URL>_summary.json`` (written by ``downpour score``; any URL Downpour can read) and
prints its ``drift`` section (one JSON object on stdout with ``--json``). Exit 0 whether or not the
batch drifted (drift is a finding, not a failure), also when the run has no drift figures (a model
without a drift reference, or ``scoring.drift.enabled: false``: ``{"drift": null, ...}``); 3 when the
summary is missing.

dags/downpour_score.py runs it as its ``drift`` task: on drift, that task emits the Asset
``downpour://<use case>/drift``, on which the retraining DAG is also scheduled.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from downpour.errors import DataContractError, DownpourError


def drift_of(output_url: str) -> dict[str, Any]:
    """The ``drift`` section of the scoring run that wrote ``output_url``."""
    from downpour import storage
    from downpour.pipelines.score_history import summary_url

    url = summary_url(output_url)
    if not storage.exists(url):
        raise DataContractError(f"{url}: no scoring summary; run `downpour score --output {output_url}` first")
    drift = storage.read_json(url).get("drift")
    if not drift:
        return {"drift": None, "reasons": [f"{url}: no drift figures (a model without a drift reference, or "
                                           "scoring.drift.enabled is false)"]}
    return drift


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drift", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="the scores URL of the run (--output of score)")
    parser.add_argument("--json", action="store_true", help="print the drift section as one JSON object")
    args = parser.parse_args(argv)
    try:
        drift = drift_of(args.output)
    except DownpourError as exc:
        print(f"downpour drift: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(drift, sort_keys=True))
    else:
        verdict = ("drifted: " + "; ".join(drift["reasons"]) if drift["drift"]
                   else "no drift" if drift["drift"] is False else drift["reasons"][0])
        print(f"{args.output}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
