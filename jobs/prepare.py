"""spark-submit entry point for `downpour prepare`.

    spark-submit [spark options] jobs/prepare.py --conf conf/crm_telco.yaml [--set KEY=VALUE ...]

Everything after the script goes to `downpour prepare` (see `downpour prepare --help`). The master, executors
and resources come from spark-submit (downpour.spark.get_spark keeps them). The exit
code is the CLI's (0 ok, 2 config, 3 data contract, 4 gate refused, 1 other), which spark-submit
passes on in client mode.
"""

import sys

from downpour.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
