"""The jaxeff command: listing, and every error path exits 2 with one line."""

import json
import os
import subprocess
import sys

import pytest

from jaxeff import config as config_lib
from jaxeff.experiment import prepare_run


def _jaxeff(*args, cwd=None):
    code = "import sys; from jaxeff.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_list_shows_every_experiment_without_importing_jax():
    code = (
        "import sys; from jaxeff.cli import main; main(['list']);"
        "print('JAX_IMPORTED' if 'jax' in sys.modules else 'NO_JAX')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "NO_JAX"
    names = [line.split()[0] for line in lines[:-1]]
    assert "lm" in names and "lm-bench" in names


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "nope"], "unknown experiment 'nope'"),
        (["run", "lm", "--preset", "huge"], "unknown preset 'huge'"),
        (["run", "lm", "--set", "train.stepz=3"], "unknown config key 'stepz'"),
        (["run", "lm", "--set", "train.steps=many"], "must be an integer"),
        (["run", "lm", "--set", "model.dropout=true"], "must be a number"),
        (["run", "lm", "--set", "noequals"], "key=value"),
        (["run", "lm", "--set", "seed.x=1"], "is a value, not a section"),
        (["fly"], "invalid choice"),
        (["run"], "required"),
        (["run", "lm", "--bogus"], "unrecognized arguments"),
    ],
)
def test_error_paths_exit_2_with_one_line(args, needle, tmp_path):
    out = _jaxeff(*args, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert needle in lines[0] and "Traceback" not in out.stderr


def test_resume_without_previous_run_is_a_clear_error(tmp_path):
    out = _jaxeff("run", "lm", "--preset", "smoke", "--resume", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "jaxeff: error: --resume: no previous run of lm found under runs/"
    ]


def test_set_parses_json_and_checks_types(tmp_path):
    _, cfg, workdir = prepare_run(
        "lm",
        "smoke",
        ["train.steps=7", "optim.learning_rate=1e-3", 'data.corpora=["prose"]', "seed=3"],
        out=str(tmp_path / "r"),
    )
    assert cfg.train.steps == 7 and cfg.optim.learning_rate == 1e-3
    assert cfg.data.corpora == ("prose",) and cfg.seed == 3
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["preset"] == "smoke" and saved["config"]["train"]["steps"] == 7
    # an int is accepted where a float is expected, never a string or a bool for an int
    assert config_lib.set_path(cfg, "optim.learning_rate", 1).optim.learning_rate == 1.0
    with pytest.raises(config_lib.ConfigError, match="integer"):
        config_lib.set_path(cfg, "train.steps", True)
    assert config_lib.set_path(cfg, "data.max_bytes", None).data.max_bytes is None
