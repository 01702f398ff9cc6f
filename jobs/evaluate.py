"""spark-submit entry point for `downpour evaluate`.

    spark-submit [spark options] jobs/evaluate.py --conf conf/crm_telco.yaml [--set KEY=VALUE ...] [--gate]

Everything after the script goes to `downpour evaluate` (see `downpour evaluate --help`), except one
option for schedulers:

  --refusal-ok   with --gate, exit 0 when the gate refuses the model. The refusal is still recorded
                 (model card `evaluation.gate`, registry `history.jsonl`) and a later step acts on it:
                 jobs/publish.py exits 4 with the gate's reason. dags/downpour_retrain.py uses this so
                 that a refusal fails `publish` (a decision, not retried) rather than `evaluate`.

The master, executors and resources come from spark-submit (downpour.spark.get_spark keeps them).
The exit code is the CLI's (0 ok, 2 config, 3 data contract, 4 gate refused, 1 other), which
spark-submit passes on in client mode.
"""

import sys

from downpour.cli import main

GATE_REFUSED = 4

if __name__ == "__main__":
    args = sys.argv[1:]
    refusal_ok = "--refusal-ok" in args
    rc = main(["evaluate", *[a for a in args if a != "--refusal-ok"]])
    if rc == GATE_REFUSED and refusal_ok:
        print("downpour evaluate: the gate's refusal is recorded; the publish step acts on it", file=sys.stderr)
        rc = 0
    sys.exit(rc)
