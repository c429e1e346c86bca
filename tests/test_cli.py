"""The jaxeff command: listing, and every error path exits 2 with one line."""

import json
import os
import subprocess
import sys

import pytest

from jaxeff import config as config_lib
from jaxeff.experiment import prepare_run
from jaxeff.parallel.multiprocess import cpu_child_env


def _jaxeff(*args, cwd=None):
    code = "import sys; from jaxeff.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env=cpu_child_env(),
    )


def test_list_shows_every_experiment_without_importing_jax():
    code = (
        "import sys; from jaxeff.cli import main; main(['list']);"
        "print('JAX_IMPORTED' if 'jax' in sys.modules else 'NO_JAX')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=cpu_child_env(),
    )
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
        (["run", "lm", "--set", "train.stepz=3"], "unknown config key 'train.stepz'"),
        (["run", "lm", "--set", "train.steps=many"], "must be an integer"),
        (["run", "lm", "--set", "model.dropout=true"], "must be a number"),
        (["run", "lm", "--set", "noequals"], "key=value"),
        (["run", "lm", "--set", "seed.x=1"], "is a value, not a section"),
        (["fly"], "invalid choice"),
        (["run"], "experiment name"),
        (["run", "lm", "--bogus"], "unrecognized arguments"),
        (["generate", "hi", "--max-new-tokens", "-5"], "must be an integer >= 1, got -5"),
        (["generate", "hi", "--top-p", "1.5"], "must be a number in (0, 1]"),
        (["chat", "--temperature", "nan"], "must be a number in [0, inf)"),
        (["generate", "hi", "--model", "missing.gguf"], "GGUF file 'missing.gguf' does not exist"),
        (["serve", "--port", "-1"], "must be in 0-65535, got -1"),
        (["show", "lm", "--config", "missing.json"], "--config missing.json: cannot read it"),
        (["run", "lm", "--set", "train.log_every=0"], "train.log_every=0 must be >= 1"),
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


def _main(capsys, *argv):
    from jaxeff import cli

    try:
        code = cli.main(list(argv))
    except SystemExit as err:
        code = err.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_help_lists_presets_and_every_config_key_with_type_and_default(capsys):
    code, out, err = _main(capsys, "run", "lm", "--help")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("jaxeff run lm: Tiny Llama-style decoder")
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ")}
    # presets, one line each with their meaning (the docstring's comment)
    assert rows["smoke"][0] == "seconds;" and "(default)" in " ".join(rows["cpu"])
    assert "make demo" in " ".join(rows["demo"])
    # every section, dotted, with type and the cpu preset's value
    assert rows["model.dim"] == ["int", "512"]
    assert rows["train.steps"] == ["int", "150"]
    assert rows["optim.learning_rate"] == ["float", "0.003"]
    assert rows["data.corpora"][-2:] == ['["prose",', '"python"]']
    assert rows["optim.clip_norm"] == ["float", "|", "None", "1.0"]
    # a section that is off (None) lists the keys that turn it on
    assert rows["model.moe"][-1] == "null" and rows["model.moe.num_experts"][0] == "int"
    for prefix in ("model.", "train.", "optim.", "data."):
        assert sum(k.startswith(prefix) for k in rows) >= 5, prefix


def test_list_shows_a_distinct_full_sentence_for_every_experiment(capsys):
    code, out, _ = _main(capsys, "list")
    assert code == 0
    summaries = [line.split("]", 1)[1].strip() for line in out.strip().splitlines()]
    assert len(summaries) == len(set(summaries)), "two experiments share a summary"
    for text in summaries:
        assert text.endswith(".") and not text.endswith("et al."), text


def test_show_prints_the_resolved_config_and_config_file_sets_nested_and_dotted_keys(
    capsys, tmp_path
):
    from jaxeff import config as config_lib
    from jaxeff.experiment import get_experiment

    code, out, _ = _main(capsys, "show", "lm", "--preset", "smoke")
    assert code == 0
    assert json.loads(out) == json.loads(
        json.dumps(config_lib.to_dict(get_experiment("lm").get_config("smoke")))
    )
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"train": {"steps": 7, "batch_size": 3}, "optim.b1": 0.8}))
    code, out, _ = _main(
        capsys, "show", "lm", "--preset", "smoke", "--config", str(cfg_file), "--set", "seed=4"
    )
    shown = json.loads(out)
    assert code == 0 and shown["train"]["steps"] == 7 and shown["train"]["batch_size"] == 3
    assert shown["optim"]["b1"] == 0.8 and shown["seed"] == 4
    # --set comes after --config; a run's own config.json is a config file too
    _, cfg, workdir = prepare_run(
        "lm", "smoke", ["train.steps=9"], out=str(tmp_path / "r"), config_file=str(cfg_file)
    )
    assert cfg.train.steps == 9 and cfg.train.batch_size == 3
    code, out, _ = _main(
        capsys, "show", "lm", "--preset", "cpu", "--config", os.path.join(workdir, "config.json")
    )
    assert json.loads(out)["train"] == config_lib.to_dict(cfg)["train"]


@pytest.mark.parametrize(
    "setup, out_arg, needle",
    [
        ("file", "f", "is a file, not a directory"),
        ("file", "f/run", "is a file, not a directory"),
    ],
)
def test_out_at_or_under_an_existing_file_is_one_line(capsys, tmp_path, setup, out_arg, needle):
    (tmp_path / "f").write_text("not a directory")
    code, out, err = _main(
        capsys, "run", "lm", "--preset", "smoke", "--out", str(tmp_path / out_arg)
    )
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert (tmp_path / "f").read_text() == "not a directory"


@pytest.mark.parametrize(
    "kv, needle",
    [
        ("train.log_every=0", "train.log_every=0 must be >= 1"),
        ("train.eval_batches=0", "train.eval_batches=0 must be"),
        ("optim.learning_rate=NaN", "must be a finite number"),
        ("optim.b2=1", "optim.b2=1.0 must be in [0, 1)"),
        ("seed=-1", "seed=-1 must be >= 0"),
        ("model.moe.top_k=-2", "model.moe.top_k=-2 must be >= 0"),
    ],
)
def test_out_of_range_numbers_are_rejected_before_the_run(capsys, tmp_path, kv, needle):
    code, out, err = _main(
        capsys, "run", "lm", "--preset", "smoke", "--out", str(tmp_path / "r"), "--set", kv
    )
    assert code == 2 and out == "" and err.count("\n") == 1
    assert needle in err, err
    assert not (tmp_path / "r").exists()  # nothing started


def test_serve_port_out_of_range_in_a_subprocess_is_one_line(tmp_path):
    out = _jaxeff("serve", "--port", "65536", cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "jaxeff serve: error: argument --port: must be in 0-65535, got 65536"
    ]
