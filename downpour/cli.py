"""The ``downpour`` command line. Errors users can fix print one line and exit 2/3, never a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from downpour.errors import ConfigError, DownpourError
from downpour.logs import LOG, setup_logging


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with a one-line message (argparse's own convention, kept explicit)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"downpour: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _add_conf(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conf", required=True, help="YAML config file (see conf/)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, dotted, value parsed as YAML (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="downpour", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="write a synthetic raw dataset with a Spark job")
    g.add_argument("kind", choices=["fraud", "crm"])
    g.add_argument("--rows", type=int, required=True)
    g.add_argument("--out", required=True, help="output URL (local path, file://, hdfs://, s3a://, dbfs:/)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--dirty-rate", type=float, default=0.0, help="fraction of rows made dirty (0..0.5)")
    g.add_argument("--format", choices=["csv", "parquet"], default="csv")
    g.add_argument("--partitions", type=int, default=None, help="output files (default: by size)")
    g.add_argument("--master", default=None, help="Spark master (default local[*])")

    p = sub.add_parser("prepare", help="ingest, clean, quarantine, split, features, Parquet shards")
    _add_conf(p)
    p.add_argument("--force", action="store_true", help="rebuild even if this data version is published")

    t = sub.add_parser("train", help="Horovod-on-Spark training from the shards; exports the model")
    _add_conf(t)
    t.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")

    e = sub.add_parser("evaluate", help="metrics, report; with --gate promote or refuse")
    _add_conf(e)
    e.add_argument("--gate", action="store_true", help="promote to the registry only if not worse")

    s = sub.add_parser("score", help="batch-score a raw table with the exported model")
    _add_conf(s)
    s.add_argument("--input", required=True, help="raw table URL")
    s.add_argument("--output", required=True, help="where the scores (Parquet) go")
    s.add_argument("--model", default=None, help="model directory (default: <output.path>/model)")
    s.add_argument("--format", choices=["csv", "json", "parquet"], default=None,
                   help="input format (default: input.format of the config)")
    s.add_argument("--history", action="append", default=[], metavar="URL",
                   help="past events for window features: raw rows in the input's format (e.g. yesterday's "
                        "file) or a history written by --history-out (repeatable; the model's own history "
                        "is always used)")
    s.add_argument("--history-out", default=None, metavar="URL",
                   help="publish the history rolled forward over this run's rows (for tomorrow's run)")
    s.add_argument("--history-store", default=None, metavar="URL",
                   help="a history that is read when it exists and rolled forward after scoring")
    s.add_argument("--no-history", action="store_true",
                   help="score window features from the input alone (every entity starts fresh)")

    r = sub.add_parser("run", help="prepare, train and evaluate in one go")
    _add_conf(r)
    r.add_argument("--force", action="store_true")
    r.add_argument("--gate", action="store_true")

    d = sub.add_parser("demo", help="generate fraud data and run the whole pipeline on local Spark")
    d.add_argument("--out", default="/tmp/downpour-demo")
    d.add_argument("--rows", type=int, default=200_000)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    from downpour import api

    if args.command == "generate":
        if args.rows < 1:
            raise ConfigError("--rows: must be >= 1")
        if not 0 <= args.dirty_rate <= 0.5:
            raise ConfigError("--dirty-rate: must be within [0, 0.5]")
        api.generate(args.kind, rows=args.rows, out=args.out, seed=args.seed, dirty_rate=args.dirty_rate,
                     fmt=args.format, partitions=args.partitions, master=args.master)
        return 0
    if args.command == "demo":
        return api.demo(out=args.out, rows=args.rows)

    cfg = api.load(args.conf, args.overrides)
    if args.command == "prepare":
        api.prepare(cfg, force=args.force)
    elif args.command == "train":
        api.train(cfg, fresh=args.fresh)
    elif args.command == "evaluate":
        api.evaluate(cfg, gate=args.gate)
    elif args.command == "score":
        api.score(cfg, input_url=args.input, output_url=args.output, model_dir=args.model, fmt=args.format,
                  history=args.history, history_out=args.history_out, history_store=args.history_store,
                  no_history=args.no_history)
    elif args.command == "run":
        api.run(cfg, force=args.force, gate=args.gate)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return _dispatch(args)
    except DownpourError as exc:
        if args.debug:
            LOG.exception("failed")
        print(f"downpour {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"downpour {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line unless --debug
        if args.debug or LOG.isEnabledFor(logging.DEBUG):
            LOG.exception("failed")
        print(f"downpour {args.command}: internal error: {exc.__class__.__name__}: {exc} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
