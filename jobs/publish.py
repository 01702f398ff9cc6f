"""The publish step of a retraining pipeline: act on the quality gate's decision for the model just evaluated.

    python jobs/publish.py --conf conf/crm_telco.yaml [--set KEY=VALUE ...] [--json]
    spark-submit jobs/publish.py --conf ...      (no Spark work: runs wherever the driver runs)

`downpour evaluate --gate` records its decision in the model card (``<output.path>/model/
model_card.json``, key ``evaluation.gate``) and in the registry (``history.jsonl``; ``champion.json``
when promoted). This step reads that decision for the model of this run:

* promoted: checks that the registry's champion is that model, prints it (one JSON object on stdout
  with ``--json``) and exits 0;
* refused: prints the gate's reason and exits 4 (the exit code of a refusal everywhere in Downpour);
* not evaluated with ``--gate``, or no model: exits 3 naming the file; bad config: exits 2.

dags/downpour_retrain.py runs it as its ``publish`` task, so a refusal fails that task with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from downpour.errors import DataContractError, DownpourError, GateRefused


def gate_decision(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model card, the gate decision recorded in it) for the model under ``cfg.output.path``."""
    from downpour.artifact import ModelArtifact
    from downpour.layout import RunLayout

    model = ModelArtifact.at(RunLayout(cfg.output.path).model)
    card = model.card(hint="run train first")
    gate = (card.get("evaluation") or {}).get("gate")
    if not gate:
        raise DataContractError(f"{model.card_url}: model {card.get('model_version')} has no quality-gate decision; "
                                "run `downpour evaluate --gate` first")
    return card, gate


def publish(cfg: Any) -> dict[str, Any]:
    """The champion record when this run's model was promoted; GateRefused with the reason otherwise."""
    from downpour.training.registry import Registry

    card, gate = gate_decision(cfg)
    version = str(card["model_version"])
    if not gate.get("promoted"):
        raise GateRefused(gate.get("reason") or f"model {version} was refused by the quality gate")
    registry = Registry(gate["registry"])
    champion = registry.champion()
    if champion is None or champion.get("model_version") != version:
        current = champion.get("model_version") if champion else None
        raise DownpourError(f"registry {registry.root}: model {version} was promoted, but the champion is now "
                            f"{current}: a later evaluation replaced it; nothing to publish")
    return {
        "name": cfg.name, "model_version": version, "data_version": card.get("data_version"),
        "metric": gate.get("metric"), "value": gate.get("value"), "reason": gate.get("reason"),
        "registry": str(registry.root), "model_dir": registry.layout.pointed(champion["path"]).model,
        "champion": champion,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="publish", description=__doc__.splitlines()[0])
    parser.add_argument("--conf", required=True, help="YAML config file (see conf/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    args = parser.parse_args(argv)

    from downpour.config import load_config
    from downpour.logs import LOG, setup_logging

    setup_logging()
    try:
        result = publish(load_config(args.conf, args.overrides))
    except DownpourError as exc:
        print(f"downpour publish: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"status": "refused" if isinstance(exc, GateRefused) else "error",
                              "exit_code": exc.exit_code, "reason": str(exc)}))
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - one line for the scheduler's log, like the CLI
        print(f"downpour publish: internal error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    LOG.info("publish: model %s of %s is the champion (%s=%s) at %s", result["model_version"], result["name"],
             result["metric"], result["value"], result["model_dir"])
    print(json.dumps({"status": "published", **result}, default=str) if args.json else result["model_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
