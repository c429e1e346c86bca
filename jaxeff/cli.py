"""The ``jaxeff`` command.

    jaxeff list
    jaxeff run NAME [--preset smoke|cpu|demo] [--set a.b=value ...] [--out DIR] [--resume]

Progress goes to stderr; the last line on stdout is one JSON object with the final metrics
(also written to ``summary.json`` in the run directory). A bad name, preset, key or value is
reported in one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage block
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxeff", description="jaxeff: efficiency methods for large models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    sub.add_parser("list", help="list every experiment, one line each")
    run = sub.add_parser("run", help="run an experiment")
    run.add_argument("name", help="experiment name (see `jaxeff list`)")
    run.add_argument("--preset", default=None, help="smoke | cpu | demo (default: cpu)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field; the value is parsed as JSON when it can be",
    )
    run.add_argument("--out", default=None, help="run directory (default runs/NAME/<UTC time>)")
    run.add_argument("--resume", action="store_true", help="continue the newest run of NAME")
    return parser


def _fail(message: str) -> int:
    message = " ".join(str(message).split())
    sys.stderr.write(f"jaxeff: error: {message}\n")
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxeff import experiment

    try:
        if args.command == "list":
            for name, exp in experiment.registry().items():
                presets = ",".join(exp.presets)
                print(f"{name:<24} [{presets}]  {exp.summary}")
            return 0
        exp, cfg, workdir = experiment.prepare_run(
            args.name, args.preset, args.overrides, args.out, args.resume
        )
        sys.stderr.write(f"jaxeff: running {args.name} in {workdir}\n")
        summary = experiment.run_experiment(exp, cfg, workdir, resume=args.resume)
    except ValueError as err:  # ConfigError, CheckpointError and bad data are ValueErrors
        return _fail(err)
    except KeyboardInterrupt:
        return _fail("interrupted; continue with --resume")
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
