#!/usr/bin/env bash
# The test command: lint, type-check and run the whole test suite against a real Kafka broker.
#
#   ./ops/test.sh [pytest args]        e.g. ./ops/test.sh tests/quantize -x
#
# Steps: promtool (Debian's prometheus package, installed when missing: tests/ops runs it),
# ops/setup.sh (venv), ops/kafka.sh fetch (jars), a dedicated broker on
# ${ADACODE_TEST_KAFKA_PORT:-19092} with its data in a temp dir (started in the background while
# ruff and mypy run), then `ruff check .`, `ruff format --check .`, `mypy`, and
# `python -m pytest -q -p no:cacheprovider [pytest args]` with ADACODE_TEST_BOOTSTRAP pointing at
# the broker. The broker and the temp dir are always removed on exit.
#
# Exit status: pytest's when it failed (5, no tests collected, counts as failure); otherwise 1 if
# a lint or type check failed; 0 when everything passed.
set -euo pipefail

readonly SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly REPO_DIR="$(cd "${SCRIPT_DIR}/.." && pwd)"
readonly VENV="${ADACODE_VENV:-${HOME}/.cache/adacode/venv}"
readonly KAFKA_SH="${SCRIPT_DIR}/kafka.sh"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONDONTWRITEBYTECODE="${PYTHONDONTWRITEBYTECODE:-1}"
# This checkout's code wins even if the shared venv's editable install points at another one.
export PYTHONPATH="${REPO_DIR}${PYTHONPATH:+:${PYTHONPATH}}"

cd "${REPO_DIR}"

port_free() {
    ! timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# promtool checks ops/prometheus/alerts.yml (tests/ops/test_alerts.py); Debian's `prometheus`
# package provides /usr/bin/promtool. Installed once, never skipped: without it, stop here.
ensure_promtool() {
    command -v promtool >/dev/null 2>&1 && return 0
    echo "promtool missing: apt-get install -y prometheus"
    local sudo=()
    if ((EUID != 0)); then
        sudo=(sudo -n)
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! "${sudo[@]}" apt-get install -y --no-install-recommends prometheus; then
        "${sudo[@]}" apt-get update && "${sudo[@]}" apt-get install -y --no-install-recommends prometheus ||
            true
    fi
    if ! command -v promtool >/dev/null 2>&1; then
        echo "test.sh: promtool could not be installed (apt-get install -y prometheus failed);" \
            "install it (it checks ops/prometheus/alerts.yml) and run again" >&2
        exit 1
    fi
}
ensure_promtool

"${SCRIPT_DIR}/setup.sh"
"${KAFKA_SH}" fetch
PY="${VENV}/bin/python"

# ---------------------------------------------------------------- test broker
if [[ -n "${ADACODE_TEST_KAFKA_PORT:-}" ]]; then
    kafka_port="${ADACODE_TEST_KAFKA_PORT}"
    kafka_cport="$((kafka_port + 1))"
else
    kafka_port=19092
    kafka_cport=19093
    # Another test run on this machine may hold the default ports: take two free ones.
    if ! port_free "${kafka_port}" || ! port_free "${kafka_cport}"; then
        read -r kafka_port kafka_cport < <("${PY}" - <<'EOF'
import socket
a, b = socket.socket(), socket.socket()
a.bind(("127.0.0.1", 0))
b.bind(("127.0.0.1", 0))
print(a.getsockname()[1], b.getsockname()[1])
EOF
        )
        echo "ports 19092/19093 busy; test broker uses ${kafka_port}/${kafka_cport}"
    fi
fi

tmp_dir="$(mktemp -d "${TMPDIR:-/tmp}/adacode-test.XXXXXX")"
kafka_args=(--port "${kafka_port}" --controller-port "${kafka_cport}" --data "${tmp_dir}/kafka")
up_pid=""

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n "${up_pid}" ]] && kill -0 "${up_pid}" 2>/dev/null; then
        kill -TERM "${up_pid}" 2>/dev/null || true
        wait "${up_pid}" 2>/dev/null || true
    fi
    "${KAFKA_SH}" down "${kafka_args[@]}" >/dev/null 2>&1 ||
        echo "test.sh: could not stop the test broker; see ${tmp_dir}/kafka" >&2
    rm -rf "${tmp_dir}"
    exit "${status}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

up_started=${SECONDS}
"${KAFKA_SH}" up "${kafka_args[@]}" >"${tmp_dir}/up.out" 2>&1 &
up_pid=$!

# ---------------------------------------------------------------- lint and types
declare -a failed=()
run_check() {
    local name="$1"
    shift
    echo "== ${name}"
    if ! "$@"; then
        failed+=("${name}")
    fi
}
run_check "ruff check" "${VENV}/bin/ruff" check .
run_check "ruff format --check" "${VENV}/bin/ruff" format --check .
run_check "mypy" "${VENV}/bin/mypy"

# ---------------------------------------------------------------- tests
up_status=0
wait "${up_pid}" || up_status=$?
up_pid=""
cat "${tmp_dir}/up.out"
if ((up_status != 0)); then
    echo "test.sh: the test broker did not start (ops/kafka.sh up exited ${up_status}); output above" >&2
    exit 1
fi
echo "test broker ready $((SECONDS - up_started))s after launch"
export ADACODE_TEST_BOOTSTRAP="127.0.0.1:${kafka_port}"

echo "== pytest $*"
pytest_status=0
"${PY}" -m pytest -q -p no:cacheprovider "$@" || pytest_status=$?

if ((pytest_status == 5)); then
    echo "test.sh: pytest collected no tests; that is a failure here (check the paths/-k given)" >&2
fi
if ((${#failed[@]} > 0)); then
    (IFS=","; echo "test.sh: failed checks: ${failed[*]}" >&2)
fi
if ((pytest_status != 0)); then
    exit "${pytest_status}"
fi
if ((${#failed[@]} > 0)); then
    exit 1
fi
echo "test.sh: all checks and tests passed"
