"""spark-submit entry point for `downpour score`.

    spark-submit [spark options] jobs/score.py --conf conf/crm_telco.yaml [--set KEY=VALUE ...]

Everything after the script goes to `downpour score` (see `downpour score --help`). The master, executors
and resources come from spark-submit (downpour.spark.get_spark keeps them). The exit
code is the CLI's (0 ok, 2 config, 3 data contract, 4 gate refused, 1 other), which spark-submit
passes on in client mode.
"""

import sys

from downpour.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
