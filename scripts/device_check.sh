#!/usr/bin/env bash
# The GPU check of jaxeff, for one lent GPU machine (an H100 or H200, 16 cores) from a bare
# checkout, in under 8 minutes:
#
#   bash scripts/device_check.sh [WHEELS_DIR] [OUT_DIR]      (defaults: .whl runs/device_check)
#
# 1. installs the wheels of WHEELS_DIR (`make device-wheels` fills .whl/ with the packages jaxeff
#    imports that the machine's image lacks) into /tmp/site with --no-index --no-deps, and
#    jaxeff itself without dependencies (editable; else a plain install into /tmp/site);
# 2. prints jax.devices() and writes OUT_DIR/env.json;
# 3. runs the gpu-marked tests (`pytest -m gpu` over the test files that use the marker);
# 4. runs `jaxeff run lm|kernel-bench|generate-bench --preset gpu --out OUT_DIR/<name>`;
# 5. writes OUT_DIR/device_check.json (scripts/device_check_report.py): device, jax version,
#    gpu_tests {passed, failed, skipped}, and each run's summary.json (or an error string).
#
# PYTHON (python3) picks the interpreter. Each step has its own time limit and the whole script a budget (DEVICE_CHECK_BUDGET_S, 450 s):
# a step gets at most what is left of it. Step logs: OUT_DIR/logs/<step>.log. On the device
# tool (which returns at most 8 files of $OUT), give a scratch OUT_DIR and copy the report:
#
#   bash scripts/device_check.sh .whl /tmp/dc; cp /tmp/dc/device_check.json $OUT/
#
# The exit code is 0 when the report was written, whatever the steps gave (see its "ok").
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
WHEELS=${1:-.whl}
OUT_DIR=${2:-runs/device_check}
PY=${PYTHON:-python3}
SITE=${DEVICE_CHECK_SITE:-/tmp/site}
BUDGET=${DEVICE_CHECK_BUDGET_S:-450}
LOGS="$OUT_DIR/logs"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
START=$(date +%s)
mkdir -p "$LOGS" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOGS="$OUT_DIR/logs"

say() { echo "device_check [$(($(date +%s) - START)) s]: $*"; }

# step NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S, what is left of the budget),
# output to logs/NAME.log; writes "rc seconds limit" to logs/NAME.rc
step() {
    local name=$1 limit=$2 t0 rc left
    shift 2
    left=$((START + BUDGET - $(date +%s) - 10))
    if ((left < 15)); then
        say "$name: skipped (budget of $BUDGET s spent)"
        echo "skipped: the budget of $BUDGET s was spent" >"$LOGS/$name.log"
        return 0
    fi
    ((limit > left)) && limit=$left
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    echo "$rc $(($(date +%s) - t0)) $limit" >"$LOGS/$name.rc"
    say "$name: exit $rc in $(($(date +%s) - t0)) s (limit $limit s)"
    if ((rc != 0)); then tail -n 8 "$LOGS/$name.log" | sed 's/^/    /'; fi
    return 0
}

install() {
    local wheels=()
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    if ((${#wheels[@]})); then
        echo "installing ${#wheels[@]} wheels from $WHEELS into $SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${wheels[@]}" || return 1
    else
        echo "no wheels in $WHEELS (make device-wheels): using the image's packages only"
    fi
    # jaxeff without dependencies: editable (kernels/ and experiments/ map to jaxeff.kernels and
    # jaxeff.experiments, as in `make test`), else a plain install into $SITE;
    # DEVICE_CHECK_INSTALL=0 keeps the jaxeff already installed (a `make test` venv)
    if [[ ${DEVICE_CHECK_INSTALL:-1} == 0 ]]; then return 0; fi
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . && return 0
    echo "editable install failed: installing jaxeff into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" . \
        || return 1
    echo "PYTHONSAFEPATH=1" >"$LOGS/install.env" # the checkout's jaxeff/ must not shadow it
}

export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
install >"$LOGS/install.log" 2>&1 # local files only (--no-index): seconds, no time limit
rc=$?
echo "$rc $(($(date +%s) - t0)) 0" >"$LOGS/install.rc"
say "install: exit $rc in $(($(date +%s) - t0)) s"
tail -n 4 "$LOGS/install.log" | sed 's/^/    /'
if [[ -f "$LOGS/install.env" ]]; then export PYTHONSAFEPATH=1; fi

ENV_PY='
import json, sys
import jax
devices = jax.devices()
print(devices)
json.dump({"device": str(getattr(devices[0], "device_kind", devices[0])),
           "devices": [str(d) for d in devices], "backend": jax.default_backend(),
           "jax_version": jax.__version__}, open(sys.argv[1], "w"))
'
step env 90 "$PY" -c "$ENV_PY" "$OUT_DIR/env.json"
cat "$LOGS/env.log"

mapfile -t GPU_TESTS < <(grep -rlE 'mark\.gpu\b' tests --include='*.py' | sort)
say "gpu-marked test files: ${GPU_TESTS[*]:-none}"
if ((${#GPU_TESTS[@]})); then
    step gpu-tests 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider \
        --junitxml="$OUT_DIR/gpu_tests.xml" "${GPU_TESTS[@]}"
    tail -n 3 "$LOGS/gpu-tests.log"
fi

step lm 100 "$PY" -m jaxeff.cli run lm --preset gpu --out "$OUT_DIR/lm"
step kernel-bench 110 "$PY" -m jaxeff.cli run kernel-bench --preset gpu \
    --out "$OUT_DIR/kernel-bench"
step generate-bench 80 "$PY" -m jaxeff.cli run generate-bench --preset gpu \
    --out "$OUT_DIR/generate-bench"

say "report"
"$PY" scripts/device_check_report.py "$OUT_DIR"
