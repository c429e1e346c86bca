"""Assemble ``device_check.json`` from what scripts/device_check.sh left in its output folder.

    python scripts/device_check_report.py OUT_DIR

Reads ``OUT_DIR/env.json`` (device, jax version), ``OUT_DIR/gpu_tests.xml`` (pytest's JUnit
report), ``OUT_DIR/<experiment>/summary.json`` and ``OUT_DIR/logs/<step>.rc`` / ``.log`` (each
step's exit code, seconds and output). A missing or unreadable piece becomes an error string in
its place (with the step's exit code and the last lines of its log), never a crash. Writes
``OUT_DIR/device_check.json`` and prints it. Standard library only (it runs on a bare machine).
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET

# report key -> (step name in logs/, folder of its summary.json under OUT_DIR)
EXPERIMENTS = {
    "lm": ("lm", "lm"),
    "kernel_bench": ("kernel-bench", "kernel-bench"),
    "generate_bench": ("generate-bench", "generate-bench"),
}
TAIL_LINES = 15


def _step(out_dir: str, name: str) -> dict:
    """``{"rc", "seconds", "limit_s"}`` of a step (``rc`` None when it did not run) and the
    last lines of its log."""
    info: dict = {"rc": None, "seconds": None, "limit_s": None}
    try:
        with open(os.path.join(out_dir, "logs", f"{name}.rc")) as f:
            fields = f.read().split()
        info.update(zip(("rc", "seconds", "limit_s"), map(int, fields[:3]), strict=False))
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(out_dir, "logs", f"{name}.log"), errors="replace") as f:
            info["tail"] = [line.rstrip("\n") for line in f.readlines()[-TAIL_LINES:]]
    except OSError:
        info["tail"] = []
    return info


def _why(step: dict) -> str:
    rc = step["rc"]
    if rc is None:
        return "did not run"
    if rc in (124, 137):
        return f"timed out after {step['seconds']} s (limit {step['limit_s']} s)"
    return f"exit {rc} after {step['seconds']} s"


def _error(what: str, step: dict) -> str:
    tail = " | ".join(line.strip() for line in step["tail"][-5:] if line.strip())
    return f"error: {what} ({_why(step)})" + (f"; last lines: {tail}" if tail else "")


def _json_file(path: str):
    with open(path) as f:
        return json.load(f)


def gpu_tests(out_dir: str) -> dict | str:
    """Counts from pytest's JUnit XML: passed, failed (failures + errors), skipped, total."""
    step = _step(out_dir, "gpu-tests")
    try:
        root = ET.parse(os.path.join(out_dir, "gpu_tests.xml")).getroot()
    except (OSError, ET.ParseError) as err:
        return _error(f"no readable gpu_tests.xml: {type(err).__name__}", step)
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    failed = count["failures"] + count["errors"]
    return {
        "passed": count["tests"] - failed - skipped,
        "failed": failed,
        "skipped": skipped,
        "total": count["tests"],
        "rc": step["rc"],
        "failed_tests": [
            f"{case.get('classname')}::{case.get('name')}"
            for case in root.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ],
    }


def experiment(out_dir: str, step_name: str, folder: str):
    step = _step(out_dir, step_name)
    path = os.path.join(out_dir, folder, "summary.json")
    try:
        return _json_file(path)
    except OSError:
        return _error(f"no {folder}/summary.json", step)
    except ValueError as err:
        return _error(f"{folder}/summary.json is not JSON: {err}", step)


def assemble(out_dir: str) -> dict:
    try:
        env = _json_file(os.path.join(out_dir, "env.json"))
    except (OSError, ValueError):
        env = {"device": _error("jax did not report its devices", _step(out_dir, "env"))}
    report = {
        "device": env.get("device"),
        "jax_version": env.get("jax_version"),
        "backend": env.get("backend"),
        "devices": env.get("devices"),
        "gpu_tests": gpu_tests(out_dir),
    }
    for key, (step_name, folder) in EXPERIMENTS.items():
        report[key] = experiment(out_dir, step_name, folder)
    report["steps"] = {}
    for name in ("install", "env", "gpu-tests", *(s for s, _ in EXPERIMENTS.values())):
        step = _step(out_dir, name)
        report["steps"][name] = {k: step[k] for k in ("rc", "seconds", "limit_s")}
    report["ok"] = (
        isinstance(report["gpu_tests"], dict)
        and report["gpu_tests"]["failed"] == 0
        and report["gpu_tests"]["passed"] > 0
        and all(isinstance(report[k], dict) for k in EXPERIMENTS)
    )
    return report


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python scripts/device_check_report.py OUT_DIR\n")
        return 2
    report = assemble(argv[0])
    text = json.dumps(report, indent=1, default=str)
    with open(os.path.join(argv[0], "device_check.json"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
