#!/usr/bin/env bash
# The demo, end to end on a fresh machine: set up, start a local Kafka broker, create the
# topics, run the worker, replay a dataset, print what the worker holds, stop.
#
#   ./ops/demo.sh                                   synthetic dataset (generated)
#   ./ops/demo.sh --dataset ../shared/datasets/office   real data
#   ./ops/demo.sh --keep-broker                     leave the broker running afterwards
#
# With Docker instead: docker compose up -d kafka, then
#   ADACODE_KAFKA_BOOTSTRAP=127.0.0.1:9092 ./ops/demo.sh --no-broker
set -euo pipefail

readonly REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${REPO_DIR}"

keep_broker=0
own_broker=1
demo_args=()
while (($# > 0)); do
    case "$1" in
        --keep-broker) keep_broker=1 ;;
        --no-broker) own_broker=0 ;;
        --dataset | --limit)
            (($# >= 2)) || { echo "demo.sh: $1 needs a value" >&2; exit 2; }
            demo_args+=("$1" "$2")
            shift
            ;;
        -h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "demo.sh: unknown argument '$1'; allowed: --dataset DIR, --limit N, --keep-broker, --no-broker" >&2; exit 2 ;;
    esac
    shift
done

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
port="${ADACODE_KAFKA_PORT:-9092}"
export ADACODE_KAFKA_BOOTSTRAP="${ADACODE_KAFKA_BOOTSTRAP:-127.0.0.1:${port}}"
workdir="${ADACODE_DEMO_WORKDIR:-${REPO_DIR}/.cache/demo}"
rm -rf "${workdir}"
mkdir -p "${workdir}"
export ADACODE_STATE_DIR="${workdir}/state"
export ADACODE_TOPIC_PREFIX="${ADACODE_TOPIC_PREFIX:-demo$(date +%s).}"

echo "== set-up (virtualenv, project) =="
bash ops/setup.sh
if ((own_broker)); then
    echo "== Kafka broker =="
    bash ops/kafka.sh fetch
    bash ops/kafka.sh up --port "${port}"
    if ((!keep_broker)); then
        trap 'bash ops/kafka.sh down --port "${port}" >/dev/null' EXIT
    fi
fi
echo "== demo =="
.venv/bin/adacode demo --workdir "${workdir}" "${demo_args[@]}"
