"""Property tests of the jaxeff command's bad-input paths, in-process through `cli.main`.

Every experiment's config keys get values of the wrong kind for their type (strings for
numbers, numbers for strings, NaN and infinities, negative counts, lists for scalars, objects
for lists); random argument lists mix valid and invalid commands, flags and values. Each case
must end in exit 2 with exactly one line on stderr naming what was wrong, nothing on stdout
and no traceback. Hypothesis runs a bounded, derandomized number of examples so CI sees the
same cases every time.
"""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxeff import cli, experiment
from jaxeff import config as config_lib

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _keys() -> list[tuple[str, str, str, object]]:
    """``(experiment, dotted key, type name, smoke value)`` of every leaf config key."""
    rows = []
    for name, exp in experiment.registry().items():
        cfg = exp.get_config("smoke")
        for key, type_name, value in config_lib.describe(cfg):
            rows.append((name, key, type_name, value))
    return rows


KEYS = _keys()

# JSON texts (as typed after ``--set key=``) that no field of the given kind accepts
WRONG = {
    "int": ['"many"', "true", "1.5", "[1]", '{"a": 1}', "NaN", "-7", "Infinity"],
    "float": ['"fast"', "true", "[1.0]", '{"a": 1}', "NaN", "Infinity", "-Infinity"],
    "bool": ["1", "0", '"yes"', "[true]", "null", "2.5"],
    "str": ["1", "2.5", "true", "[1]", '{"a": "b"}'],
    "tuple": ['{"a": 1}', "1", "true", "2.5"],
}


def _kind(type_name: str) -> str | None:
    head = type_name.split(" | ")[0]
    if head.startswith("tuple"):
        return "tuple"
    return head if head in WRONG else None


FUZZABLE = [(n, k, t, v) for n, k, t, v in KEYS if _kind(t)]


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as err:  # argparse errors
        code = err.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _assert_one_error_line(code, out, err, *needles):
    assert code == 2, (code, out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("jaxeff")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_every_experiment_has_fuzzable_keys():
    names = {n for n, *_ in FUZZABLE}
    assert names == set(experiment.registry())
    assert len(FUZZABLE) > 200


@settings(SETTINGS, max_examples=300)
@given(st.sampled_from(FUZZABLE), st.data())
def test_a_wrong_kind_of_value_for_any_key_is_one_line_naming_it(capsys, row, data):
    name, key, type_name, _ = row
    options = WRONG[_kind(type_name)]
    if _kind(type_name) == "int" and key.rpartition(".")[0].endswith("mesh"):
        options = [o for o in options if o != "-7"]  # -7 reaches MeshConfig's own check
    if _kind(type_name) == "int" and key.rpartition(".")[2] in config_lib.POSITIVE_INT_FIELDS:
        options = [*options, "0"]  # a size, count or cadence
    text = data.draw(st.sampled_from(options))
    command = data.draw(st.sampled_from(["show", "run"]))
    code, out, err = _run(capsys, [command, name, "--preset", "smoke", "--set", f"{key}={text}"])
    _assert_one_error_line(code, out, err, key.rpartition(".")[2])


@SETTINGS
@given(
    st.sampled_from(sorted(experiment.registry())),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=12),
)
def test_an_unknown_key_is_one_line_listing_the_allowed_ones(capsys, name, key):
    cfg = experiment.get_experiment(name).get_config("smoke")
    known = {k for k, _, _ in config_lib.describe(cfg)}
    if any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in known):
        return  # a real key or section: not this test's case
    code, out, err = _run(capsys, ["show", name, "--preset", "smoke", "--set", f"{key}=1"])
    if key.strip(".") != key or ".." in key:
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
        return
    _assert_one_error_line(code, out, err, "allowed:")


TOKENS = [
    "run",
    "show",
    "list",
    "serve",
    "generate",
    "chat",
    "lm",
    "nope",
    "--preset",
    "smoke",
    "huge",
    "--set",
    "train.steps=-1",
    "train.stepz=1",
    "=",
    "noequals",
    "--port",
    "70000",
    "-1",
    "http",
    "--out",
    "--config",
    "/nonexistent/cfg.json",
    "--bogus",
    "--resume",
    "--max-new-tokens",
    "x",
]


@SETTINGS
@given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=7))
def test_random_argument_lists_never_traceback(capsys, tmp_path_factory, argv):
    # bad on purpose: an unknown flag, or a value no command accepts, makes every list invalid
    argv = [*argv, "--bogus"] if "--bogus" not in argv else argv
    workdir = tmp_path_factory.mktemp("cwd")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        code, out, err = _run(capsys, argv)
    finally:
        os.chdir(cwd)
    if argv[0] in ("-h", "--help"):
        return
    _assert_one_error_line(code, out, err)


@SETTINGS
@given(st.one_of(st.integers(max_value=-1), st.integers(min_value=65536), st.just("http")))
def test_serve_port_outside_0_to_65535_is_one_line(capsys, port):
    code, out, err = _run(capsys, ["serve", "--port", str(port)])
    _assert_one_error_line(code, out, err, "--port", "0-65535")


@SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(["train", "train.steps", "optim", "model.dim", "nope", "seed"]),
        st.one_of(
            st.just({"steps": "x"}),
            st.just({"stepz": 1}),
            st.just("many"),
            st.just(-1),
            st.just([1, 2]),
            st.just({"learning_rate": "fast"}),
        ),
        min_size=1,
    )
)
def test_a_bad_config_file_is_one_line(capsys, tmp_path_factory, mapping):
    path = tmp_path_factory.mktemp("cfg") / "bad.json"
    path.write_text(json.dumps(mapping))
    code, out, err = _run(capsys, ["show", "lm", "--preset", "smoke", "--config", str(path)])
    _assert_one_error_line(code, out, err)
