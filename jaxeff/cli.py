"""The ``jaxeff`` command.

    jaxeff list
    jaxeff run NAME [--preset smoke|cpu|demo] [--set a.b=value ...] [--out DIR] [--resume]
    jaxeff generate "prompt" [--chat] [--model FILE.gguf] [--max-new-tokens N] [--temperature T]
    jaxeff chat [--system TEXT] [--model FILE.gguf]
    jaxeff serve [--model FILE.gguf] [--host 127.0.0.1] [--port 8000]

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
        p.add_argument("--max-new-tokens", type=int, default=64 if name == "generate" else 256)
        p.add_argument("--temperature", type=float, default=0.0 if name == "generate" else 0.7)
        p.add_argument("--top-p", type=float, default=1.0 if name == "generate" else 0.9)
        p.add_argument("--seed", type=int, default=0)
    serve = sub.add_parser("serve", help="serve a local GGUF model as an OpenAI-compatible API")
    serve.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default localhost)")
    serve.add_argument("--port", type=int, default=8000)
    return parser


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
                print(f"{name:<24} [{presets}]  {exp.summary}")
            return 0
        from jaxeff.parallel.multiprocess import initialize_from_env

        initialize_from_env()  # joins a multi-process job when launched as one; else a no-op
        exp, cfg, workdir = experiment.prepare_run(
            args.name, args.preset, args.overrides, args.out, args.resume
        )
        sys.stderr.write(f"jaxeff: running {args.name} in {workdir}\n")
        summary = experiment.run_experiment(exp, cfg, workdir, resume=args.resume)
    except ValueError as err:  # ConfigError, CheckpointError and bad data are ValueErrors
        return _fail(err)
    except KeyboardInterrupt:
        if args.command == "serve":
            return 0
        return _fail("interrupted; continue with --resume")
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
