"""scripts/device_check.sh parses, and its report assembler turns fake step outputs (summaries,
a JUnit file, exit codes, missing pieces) into one device_check.json without crashing."""

import importlib.util
import json
import os
import shutil
import subprocess

import pytest

from jaxeff.parallel.multiprocess import cpu_child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="7">
<testcase classname="tests.kernels.test_on_device" name="test_a"/>
<testcase classname="tests.kernels.test_on_device" name="test_b"><failure message="x"/></testcase>
<testcase classname="tests.nn.test_attention_impls" name="test_c"><error message="y"/></testcase>
</testsuite></testsuites>
"""


def _report_module():
    spec = importlib.util.spec_from_file_location(
        "device_check_report", os.path.join(SCRIPTS, "device_check_report.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_check_script_is_valid_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    out = subprocess.run(
        [bash, "-n", os.path.join(SCRIPTS, "device_check.sh")],
        capture_output=True,
        text=True,
        timeout=30,
        env=cpu_child_env(),
    )
    assert out.returncode == 0, out.stderr


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_report_combines_summaries_and_turns_missing_ones_into_errors(tmp_path, capsys):
    out = str(tmp_path)
    env = {"device": "NVIDIA H200", "devices": ["cuda:0"], "backend": "gpu", "jax_version": "0.x"}
    _write(f"{out}/env.json", json.dumps(env))
    _write(f"{out}/gpu_tests.xml", JUNIT)
    _write(f"{out}/lm/summary.json", json.dumps({"val_loss": 2.5, "tok_s": 1e6}))
    _write(f"{out}/kernel-bench/summary.json", "{not json")
    for name, rc in (("env", "0 3 90"), ("gpu-tests", "1 60 150"), ("lm", "0 80 100")):
        _write(f"{out}/logs/{name}.rc", rc + "\n")
    _write(f"{out}/logs/generate-bench.rc", "124 80 80\n")
    _write(f"{out}/logs/generate-bench.log", "loading\nValueError: SmolLM2 GGUF not found\n")

    assert _report_module().main([out]) == 0
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["device"] == "NVIDIA H200" and report["jax_version"] == "0.x"
    tests = report["gpu_tests"]
    assert {k: tests[k] for k in ("passed", "failed", "skipped", "total")} == {
        "passed": 3,
        "failed": 2,
        "skipped": 2,
        "total": 7,
    }
    assert tests["rc"] == 1 and len(tests["failed_tests"]) == 2
    assert report["lm"] == {"val_loss": 2.5, "tok_s": 1e6}
    assert report["kernel_bench"].startswith("error: kernel-bench/summary.json is not JSON")
    gen = report["generate_bench"]
    assert gen.startswith("error: no generate-bench/summary.json (timed out after 80 s")
    assert "SmolLM2 GGUF not found" in gen
    assert report["steps"]["lm"] == {"rc": 0, "seconds": 80, "limit_s": 100}
    assert report["ok"] is False


def test_report_of_an_empty_folder_is_all_errors(tmp_path):
    report = _report_module().assemble(str(tmp_path))
    assert report["device"].startswith("error: jax did not report its devices (did not run)")
    assert report["gpu_tests"].startswith("error: no readable gpu_tests.xml")
    for key in ("lm", "kernel_bench", "generate_bench"):
        assert report[key].startswith("error: no "), report[key]
    assert report["ok"] is False
