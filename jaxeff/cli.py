"""The ``jaxeff`` command.

    jaxeff list
    jaxeff run NAME [--preset P] [--config FILE.json] [--set a.b=value ...] [--out DIR] [--resume]
    jaxeff run NAME --help          # the experiment, its presets and every config key
    jaxeff show NAME [--preset P] [--config FILE.json] [--set a.b=value ...]  # config as JSON
    jaxeff lower NAME --preset P --platform cuda|tpu [--devices N] [--set ...]  # AOT, JSON
    jaxeff generate "prompt" [--chat] [--model FILE.gguf] [--max-new-tokens N] [--temperature T]
    jaxeff chat [--system TEXT] [--model FILE.gguf]
    jaxeff serve [--model FILE.gguf] [--host 127.0.0.1] [--port 8000]

Progress goes to stderr; the last line on stdout is one JSON object with the final metrics
(also written to ``summary.json`` in the run directory). A bad name, preset, key or value is
reported in one line on stderr with exit code 2. ``--config`` (a JSON object, nested or
dotted keys, or a run's ``config.json``) is applied before the ``--set`` flags.

In a multi-process job (one process per host) only process 0 prints progress, the run
directory line and the summary. A run stopped by SIGTERM (a preemption notice) saves its state
and exits with code 143 (128 + SIGTERM); ``--resume`` continues it exactly.

``jaxeff lower`` exports an experiment's train step for a platform this host does not have
(`jaxeff.lower`): ``--devices`` defaults to the preset's mesh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

RUN_USAGE = (
    "usage: jaxeff run NAME [--preset P] [--config FILE.json] [--set KEY=VALUE ...] "
    "[--out DIR] [--resume]"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage block
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxeff", description="jaxeff: efficiency methods for large models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    sub.add_parser("list", help="list every experiment, one line each")
    run = sub.add_parser("run", help="run an experiment", add_help=False)
    run.add_argument("name", nargs="?", help="experiment name (see `jaxeff list`)")
    run.add_argument(
        "-h", "--help", action="store_true", help="the experiment, its presets and config keys"
    )
    _add_config_args(run)
    run.add_argument("--out", default=None, help="run directory (default runs/NAME/<UTC time>)")
    run.add_argument("--resume", action="store_true", help="continue the newest run of NAME")
    show = sub.add_parser("show", help="print an experiment's resolved config as JSON")
    show.add_argument("name", help="experiment name (see `jaxeff list`)")
    _add_config_args(show)
    lower = sub.add_parser(
        "lower", help="lower (jax.export) an experiment's train step for cuda or tpu, as JSON"
    )
    lower.add_argument("name", help="experiment name (see `jaxeff list`)")
    _add_config_args(lower)
    lower.add_argument("--platform", required=True, choices=("cuda", "tpu"))
    lower.add_argument(
        "--devices", type=_count(1), default=None, help="target device count (default: the mesh)"
    )
    for name, help_text in (
        ("generate", "continue a prompt with a local GGUF model (default SmolLM2-135M)"),
        ("chat", "chat with a local GGUF model on the terminal (ChatML)"),
    ):
        p = sub.add_parser(name, help=help_text)
        if name == "generate":
            p.add_argument("prompt", help="the text to continue")
            p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn")
        else:
            p.add_argument("--system", default=None, help="system message")
        p.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M)")
        p.add_argument(
            "--max-new-tokens", type=_count(1), default=64 if name == "generate" else 256
        )
        p.add_argument(
            "--temperature",
            type=_number(0.0, None),
            default=0.0 if name == "generate" else 0.7,
            help="0: greedy",
        )
        p.add_argument(
            "--top-p",
            type=_number(0.0, 1.0, low_open=True),
            default=1.0 if name == "generate" else 0.9,
        )
        p.add_argument("--seed", type=_count(0), default=0)
    serve = sub.add_parser("serve", help="serve a local GGUF model as an OpenAI-compatible API")
    serve.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default localhost)")
    serve.add_argument("--port", type=_port, default=8000, help="0-65535 (default 8000)")
    return parser


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="see `jaxeff run NAME --help` (default: cpu)")
    p.add_argument(
        "--config",
        dest="config_file",
        default=None,
        metavar="FILE",
        help="a JSON object of config keys (nested or dotted), applied before --set",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field; the value is parsed as JSON when it can be",
    )


def _count(low: int):
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def _number(low: float, high: float | None, low_open: bool = False):
    """An argparse type: a finite number in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    allowed = ("(" if low_open else "[") + f"{low:g}, " + ("inf)" if high is None else f"{high:g}]")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (value > low if low_open else value >= low)
        if not ok or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be a number in {allowed}, got {text!r}")
        return value

    return parse


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in 0-65535, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0-65535, got {port}")
    return port


def experiment_help(name: str, preset: str | None = None) -> str:
    """What ``jaxeff run NAME --help`` prints: the summary, usage, presets and config keys
    (type and the preset's value)."""
    from jaxeff import config as config_lib
    from jaxeff import experiment

    exp, cfg = experiment.resolve_config(name, preset, [])
    preset = preset or experiment.DEFAULT_PRESET
    lines = [
        f"jaxeff run {name}: {exp.summary}",
        "",
        RUN_USAGE.replace("NAME", name),
        "",
        "presets:",
    ]
    helps = exp.preset_help(name)
    width = max(len(p) for p in helps)
    for p, text in helps.items():
        mark = " (default)" if p == experiment.DEFAULT_PRESET else ""
        lines.append(f"  {p:<{width}}  {text}{mark}")
    rows = config_lib.describe(cfg)
    lines += ["", f"config keys (--set KEY=VALUE; values of preset {preset}):"]
    kw = max(len(k) for k, _, _ in rows)
    tw = max(len(t) for _, t, _ in rows)
    for key, type_name, value in rows:
        lines.append(f"  {key:<{kw}}  {type_name:<{tw}}  {json.dumps(_jsonable(value))}")
    lines += ["", f"`jaxeff show {name} --preset P` prints a preset's whole config as JSON."]
    return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _generate(args) -> int:
    from jaxeff.llm.local import LocalModel

    llm = LocalModel(args.model)
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    if args.chat:
        text = llm.chat([{"role": "user", "content": args.prompt}], args.max_new_tokens, **sampling)
    else:
        text = llm.complete(args.prompt, args.max_new_tokens, **sampling)
    print(text, flush=True)
    return 0


def _chat(args) -> int:
    from jaxeff.llm.local import LocalModel

    llm = LocalModel(args.model)
    history = [{"role": "system", "content": args.system}] if args.system else []
    sampling = {"temperature": args.temperature, "top_p": args.top_p}
    sys.stderr.write("jaxeff chat: type a message; an empty line or Ctrl-D ends.\n")
    turn = 0
    while True:
        sys.stderr.write("you> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        history.append({"role": "user", "content": line.rstrip("\n")})
        reply = llm.chat(history, args.max_new_tokens, seed=args.seed + turn, **sampling)
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
        turn += 1


def _fail(message: str) -> int:
    message = " ".join(str(message).split())
    sys.stderr.write(f"jaxeff: error: {message}\n")
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxeff import config as config_lib
    from jaxeff import experiment

    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "chat":
            return _chat(args)
        if args.command == "serve":
            from jaxeff.llm.serve import serve

            serve(args.model, args.host, args.port)
            return 0
        if args.command == "list":
            for name, exp in experiment.registry().items():
                presets = ",".join(exp.presets)
                print(f"{name:<20} [{presets}]  {exp.summary}")
            return 0
        if args.command == "lower":
            from jaxeff.lower import lower

            report = lower(
                args.name,
                args.preset,
                args.platform,
                args.devices,
                args.overrides,
                args.config_file,
            )
            print(json.dumps(report), flush=True)
            return 0
        if args.command == "show":
            _, cfg = experiment.resolve_config(
                args.name, args.preset, args.overrides, args.config_file
            )
            print(json.dumps(_jsonable(config_lib.to_dict(cfg)), indent=1))
            return 0
        if args.help:
            if args.name is None:
                print(RUN_USAGE + "\n\nexperiments: " + ", ".join(experiment.registry()))
                print("`jaxeff run NAME --help` shows one's presets and config keys.")
            else:
                print(experiment_help(args.name, args.preset))
            return 0
        if args.name is None:
            return _fail("run needs an experiment name (see `jaxeff list`)")
        from jaxeff.parallel.multiprocess import initialize_from_env

        initialize_from_env()  # joins a multi-process job when launched as one; else a no-op
        exp, cfg, workdir = experiment.prepare_run(
            args.name, args.preset, args.overrides, args.out, args.resume, args.config_file
        )
        lead = experiment.process_index() == 0
        if lead:
            sys.stderr.write(f"jaxeff: running {args.name} in {workdir}\n")
        summary = experiment.run_experiment(exp, cfg, workdir, resume=args.resume)
    except _preempted() as err:
        if experiment.process_index() == 0:
            sys.stderr.write(f"jaxeff: {err}\n")
        return 143
    except ValueError as err:  # ConfigError, CheckpointError and bad data are ValueErrors
        return _fail(err)
    except OSError as err:  # a path that cannot be read or written, a port in use
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        return _fail(f"{err.strerror or err}{where}")
    except KeyboardInterrupt:
        if args.command == "serve":
            return 0
        return _fail("interrupted; continue with --resume")
    except Exception as err:  # a bug: one line, the traceback on request
        if os.environ.get("JAXEFF_TRACEBACK"):
            raise
        sys.stderr.write(
            f"jaxeff: internal error: {type(err).__name__}: {' '.join(str(err).split())} "
            "(set JAXEFF_TRACEBACK=1 for the traceback)\n"
        )
        return 1
    if lead:
        print(json.dumps(summary), flush=True)
    return 0


def _preempted():
    """`jaxeff.train.loop.Preempted` when the training loop is loaded (an exception type that
    matches nothing otherwise, so `jaxeff list` never imports jax)."""
    loop = sys.modules.get("jaxeff.train.loop")
    return loop.Preempted if loop is not None else _Never


class _Never(Exception):
    pass


if __name__ == "__main__":
    raise SystemExit(main())
