#!/usr/bin/env bash
# Single-node Apache Kafka 3.9.1 broker (KRaft, broker+controller in one JVM) for development
# and tests, run straight from the Maven jars: no Docker, no Kafka distribution needed.
#
#   ops/kafka.sh fetch                  download the broker jars once (mvn, ops/pom.xml)
#   ops/kafka.sh up     [--port N] [--controller-port N] [--data DIR]
#   ops/kafka.sh down   [--port N] [--data DIR]
#   ops/kafka.sh status [--port N] [--data DIR]     exit 0 running, 3 stopped
#   ops/kafka.sh logs   [--port N] [--data DIR] [--lines N]
#
# Environment (flags win over it):
#   ADACODE_KAFKA_HOME             jar cache; libs/ under it (default ~/.cache/adacode/kafka-3.9.1;
#                                  an unpacked kafka_2.13-3.9.1 distribution works too)
#   ADACODE_KAFKA_PORT             client port (default 9092)
#   ADACODE_KAFKA_CONTROLLER_PORT  KRaft controller port (default client port + 1)
#   ADACODE_KAFKA_DATA             state dir: data/, server.properties, kafka.log, kafka.pid
#                                  (default <repo>/.kafka/<port>)
#   ADACODE_KAFKA_HEAP             JVM heap flags (default "-Xms256m -Xmx768m")
#   ADACODE_KAFKA_START_TIMEOUT    seconds `up` waits for the broker to answer (default 90)
set -euo pipefail

readonly KAFKA_VERSION="3.9.1"
readonly SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly REPO_DIR="$(cd "${SCRIPT_DIR}/.." && pwd)"
readonly COMMANDS="fetch|up|down|status|logs"

usage() {
    sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

die_usage() {
    echo "kafka.sh: $1" >&2
    echo "usage: ops/kafka.sh {${COMMANDS}} [--port N] [--controller-port N] [--data DIR] [--lines N]" >&2
    exit 2
}

die() {
    echo "kafka.sh: $1" >&2
    exit 1
}

is_port() {
    [[ "$1" =~ ^[0-9]+$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535))
}

# ---------------------------------------------------------------- arguments
cmd=""
port="${ADACODE_KAFKA_PORT:-9092}"
controller_port="${ADACODE_KAFKA_CONTROLLER_PORT:-}"
data_dir="${ADACODE_KAFKA_DATA:-}"
lines=60
kafka_home="${ADACODE_KAFKA_HOME:-${HOME}/.cache/adacode/kafka-${KAFKA_VERSION}}"
heap="${ADACODE_KAFKA_HEAP:--Xms256m -Xmx768m}"
start_timeout="${ADACODE_KAFKA_START_TIMEOUT:-90}"

need_value() {
    # $1 flag, $2 number of remaining args (including the flag)
    (($2 >= 2)) || die_usage "$1 needs a value"
}

while (($# > 0)); do
    case "$1" in
        -h | --help | help)
            usage
            exit 0
            ;;
        --port) need_value "$1" $# && port="$2" && shift 2 ;;
        --port=*) port="${1#*=}" && shift ;;
        --controller-port) need_value "$1" $# && controller_port="$2" && shift 2 ;;
        --controller-port=*) controller_port="${1#*=}" && shift ;;
        --data) need_value "$1" $# && data_dir="$2" && shift 2 ;;
        --data=*) data_dir="${1#*=}" && shift ;;
        --lines) need_value "$1" $# && lines="$2" && shift 2 ;;
        --lines=*) lines="${1#*=}" && shift ;;
        fetch | up | down | status | logs)
            [[ -z "${cmd}" ]] || die_usage "two commands given ('${cmd}' and '$1'); give one of ${COMMANDS}"
            cmd="$1"
            shift
            ;;
        *) die_usage "unknown argument '$1'; allowed: ${COMMANDS}, --port N, --controller-port N, --data DIR, --lines N" ;;
    esac
done

[[ -n "${cmd}" ]] || die_usage "no command given; allowed: ${COMMANDS}"
is_port "${port}" || die_usage "port '${port}' is not a TCP port; give an integer in 1..65535 (--port or ADACODE_KAFKA_PORT)"
port=$((10#${port}))
if [[ -z "${controller_port}" ]]; then
    controller_port=$((port + 1))
fi
is_port "${controller_port}" || die_usage "controller port '${controller_port}' is not a TCP port; give an integer in 1..65535 (--controller-port or ADACODE_KAFKA_CONTROLLER_PORT)"
controller_port=$((10#${controller_port}))
((controller_port != port)) || die_usage "controller port ${controller_port} equals the client port; give two different ports"
[[ "${lines}" =~ ^[0-9]+$ ]] || die_usage "--lines '${lines}' is not a non-negative integer"
[[ "${start_timeout}" =~ ^[0-9]+$ ]] || die_usage "ADACODE_KAFKA_START_TIMEOUT '${start_timeout}' is not a whole number of seconds"
[[ -n "${data_dir}" ]] || data_dir="${REPO_DIR}/.kafka/${port}"

readonly libs_dir="${kafka_home}/libs"
readonly bootstrap="127.0.0.1:${port}"

# Paths inside the data dir; data_dir is made absolute once it exists (java runs elsewhere).
set_paths() {
    props="${data_dir}/server.properties"
    log4j_props="${data_dir}/log4j.properties"
    log_file="${data_dir}/kafka.log"
    pid_file="${data_dir}/kafka.pid"
    cluster_id_file="${data_dir}/cluster.id"
    log_dirs="${data_dir}/data"
}

absolute_data_dir() {
    mkdir -p "${data_dir}" || die "cannot create data dir '${data_dir}'; pick a writable --data DIR"
    data_dir="$(cd "${data_dir}" && pwd)"
    set_paths
}

# Resolve without creating (down/status/logs must not litter).
if [[ -d "${data_dir}" ]]; then
    data_dir="$(cd "${data_dir}" && pwd)"
fi
set_paths

# ---------------------------------------------------------------- helpers
port_open() {
    # true when something accepts TCP connections on 127.0.0.1:$1
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# PID of the broker owning this data dir, or nothing. Checks the pid file first, then the process
# table for a kafka.Kafka JVM started with exactly this server.properties (pid file lost).
broker_pid() {
    local pid cmdline f
    if [[ -f "${pid_file}" ]]; then
        pid="$(tr -dc '0-9' <"${pid_file}")"
        if [[ -n "${pid}" ]] && [[ -r "/proc/${pid}/cmdline" ]]; then
            cmdline="$(tr '\0' ' ' 2>/dev/null <"/proc/${pid}/cmdline" || true)"
            if [[ "${cmdline}" == *kafka.Kafka*"${props}"* ]]; then
                echo "${pid}"
                return 0
            fi
        fi
    fi
    for f in /proc/[0-9]*/cmdline; do
        cmdline="$(tr '\0' ' ' 2>/dev/null <"${f}" || true)"
        if [[ "${cmdline}" == *" kafka.Kafka ${props} "* || "${cmdline}" == *" kafka.Kafka ${props}" ]]; then
            pid="${f#/proc/}"
            echo "${pid%/cmdline}"
            return 0
        fi
    done
    return 1
}

broker_started() {
    [[ -f "${log_file}" ]] && grep -q "Kafka Server started" "${log_file}"
}

check_libs() {
    compgen -G "${libs_dir}/kafka_2.13-*.jar" >/dev/null &&
        compgen -G "${libs_dir}/kafka-clients-*.jar" >/dev/null &&
        compgen -G "${libs_dir}/kafka-server-*.jar" >/dev/null
}

require_java() {
    command -v java >/dev/null ||
        die "java not found on PATH; the Kafka ${KAFKA_VERSION} broker needs a Java 11+ runtime (e.g. apt-get install openjdk-17-jre-headless)"
}

new_cluster_id() {
    # A Kafka Uuid: 16 random bytes, URL-safe base64 without padding (22 chars), not starting
    # with '-' (the CLI would read it as a flag) - the same rule as Uuid.randomUuid().
    local id
    while :; do
        id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
        [[ "${id}" != -* && ${#id} -eq 22 ]] && break
    done
    echo "${id}"
}

log_tail() {
    if [[ -f "${log_file}" ]]; then
        echo "---- last ${lines} lines of ${log_file} ----" >&2
        tail -n "${lines}" "${log_file}" >&2
        echo "---- end of log ----" >&2
    else
        echo "(no log file at ${log_file})" >&2
    fi
}

# ---------------------------------------------------------------- commands
cmd_fetch() {
    if check_libs; then
        echo "kafka ${KAFKA_VERSION} jars present in ${libs_dir}"
        return 0
    fi
    command -v mvn >/dev/null ||
        die "broker jars missing in ${libs_dir} and mvn not found; install Maven (apt-get install maven) or point ADACODE_KAFKA_HOME at an unpacked kafka_2.13-${KAFKA_VERSION} distribution"
    echo "fetching kafka ${KAFKA_VERSION} jars into ${libs_dir} (mvn, once)"
    mkdir -p "${libs_dir}" 2>/dev/null ||
        die "cannot create ${libs_dir}; set ADACODE_KAFKA_HOME to a writable directory"
    local mvn_log="${libs_dir}/.mvn.log"
    if ! mvn -B -Dstyle.color=never -f "${SCRIPT_DIR}/pom.xml" dependency:copy-dependencies \
        "-Dkafka.libs=${libs_dir}" >"${mvn_log}" 2>&1; then
        tail -n 40 "${mvn_log}" >&2
        die "mvn could not fetch the Kafka ${KAFKA_VERSION} jars (output above, full log ${mvn_log}); check network access to Maven Central"
    fi
    check_libs || die "mvn finished but ${libs_dir} still lacks the kafka jars; check ops/pom.xml"
    echo "kafka ${KAFKA_VERSION} jars fetched into ${libs_dir}"
}

write_config() {
    cat >"${props}" <<EOF
# written by ops/kafka.sh up; rewritten on every start
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:${controller_port}
listeners=PLAINTEXT://127.0.0.1:${port},CONTROLLER://127.0.0.1:${controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:${port}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=${log_dirs}
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
num.network.threads=2
num.io.threads=4
log.retention.hours=168
log.segment.bytes=104857600
EOF
    # Everything the JVM prints goes to kafka.log; WARN and up, plus the lifecycle lines
    # `up` waits for.
    cat >"${log4j_props}" <<'EOF'
log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.Kafka$=INFO
log4j.logger.kafka.server.KafkaRaftServer=INFO
log4j.logger.kafka.server.BrokerServer=INFO
log4j.logger.kafka.server.ControllerServer=INFO
log4j.logger.org.apache.kafka.clients.NetworkClient=ERROR
EOF
}

format_storage() {
    if [[ -f "${log_dirs}/meta.properties" ]]; then
        return 0
    fi
    local cluster_id
    if [[ -s "${cluster_id_file}" ]]; then
        cluster_id="$(<"${cluster_id_file}")"
    else
        cluster_id="$(new_cluster_id)"
        echo "${cluster_id}" >"${cluster_id_file}"
    fi
    echo "formatting KRaft storage in ${log_dirs} (cluster id ${cluster_id})"
    # shellcheck disable=SC2086
    if ! java ${heap%% *} -cp "${libs_dir}/*" "-Dlog4j.configuration=file:${log4j_props}" \
        kafka.tools.StorageTool format -t "${cluster_id}" -c "${props}" --ignore-formatted \
        >>"${log_file}" 2>&1; then
        log_tail
        die "formatting KRaft storage in ${log_dirs} failed (log above); remove ${data_dir} to start from scratch"
    fi
}

cmd_up() {
    local pid began=${SECONDS}
    if pid="$(broker_pid)"; then
        if ! grep -q "^listeners=PLAINTEXT://127.0.0.1:${port}," "${props}" 2>/dev/null; then
            die "the broker for ${data_dir} (pid ${pid}) listens on another port than ${port}; stop it first: ops/kafka.sh down --data ${data_dir}"
        fi
        if port_open "${port}" && broker_started; then
            echo "kafka already running (pid ${pid}, data ${data_dir})"
            echo "bootstrap: ${bootstrap}"
            return 0
        fi
        echo "kafka process ${pid} for ${data_dir} exists but is not answering yet; waiting"
    else
        check_libs || cmd_fetch
        require_java
        absolute_data_dir
        rm -f "${pid_file}"
        if port_open "${port}"; then
            die "port ${port} is already in use by another process; stop it or pick another --port"
        fi
        if port_open "${controller_port}"; then
            die "controller port ${controller_port} is already in use by another process; stop it or pick another --controller-port"
        fi
        mkdir -p "${log_dirs}"
        write_config
        if [[ -s "${log_file}" ]]; then
            mv -f "${log_file}" "${log_file}.prev"
        fi
        : >"${log_file}"
        format_storage
        # setsid: own session, so a terminal hang-up or the caller's Ctrl-C does not kill it;
        # `exec` keeps the pid written by the inner shell equal to the JVM's pid.
        # shellcheck disable=SC2086
        setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "${pid_file}" \
            nohup java ${heap} -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
            "-Dlog4j.configuration=file:${log4j_props}" \
            -cp "${libs_dir}/*" kafka.Kafka "${props}" \
            </dev/null >>"${log_file}" 2>&1 &
        local waited=0
        while [[ ! -s "${pid_file}" ]] && ((waited < 50)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        pid="$(tr -dc '0-9' 2>/dev/null <"${pid_file}" || true)"
        [[ -n "${pid}" ]] || die "could not start java for the broker (no pid written to ${pid_file})"
        echo "kafka starting (pid ${pid}, data ${data_dir}, log ${log_file})"
    fi

    local start=${SECONDS}
    until port_open "${port}" && broker_started; do
        if ! kill -0 "${pid}" 2>/dev/null; then
            log_tail
            rm -f "${pid_file}"
            die "kafka exited during startup (log above)"
        fi
        if ((SECONDS - start >= start_timeout)); then
            log_tail
            die "kafka did not answer on ${bootstrap} within ${start_timeout}s (log above); it is still running as pid ${pid}: stop it with 'ops/kafka.sh down --port ${port} --data ${data_dir}'"
        fi
        sleep 0.2
    done
    echo "kafka up in $((SECONDS - began))s (pid ${pid})"
    echo "bootstrap: ${bootstrap}"
}

cmd_down() {
    local pid
    if ! pid="$(broker_pid)"; then
        rm -f "${pid_file}"
        echo "kafka not running (data ${data_dir})"
        return 0
    fi
    echo "stopping kafka (pid ${pid})"
    kill -TERM "${pid}" 2>/dev/null || true
    local i
    for ((i = 0; i < 300; i++)); do
        kill -0 "${pid}" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "${pid}" 2>/dev/null; then
        echo "kafka (pid ${pid}) still alive after 30s; sending SIGKILL" >&2
        kill -KILL "${pid}" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "${pid}" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "${pid}" 2>/dev/null && die "kafka (pid ${pid}) survived SIGKILL; check 'ps -p ${pid}'"
    fi
    rm -f "${pid_file}"
    echo "kafka stopped"
}

cmd_status() {
    local pid
    if pid="$(broker_pid)"; then
        if port_open "${port}" && broker_started; then
            echo "running (pid ${pid}, bootstrap ${bootstrap}, data ${data_dir})"
        else
            echo "running but not answering on ${bootstrap} yet (pid ${pid}, data ${data_dir})"
        fi
        return 0
    fi
    echo "stopped (bootstrap ${bootstrap}, data ${data_dir})"
    return 3
}

cmd_logs() {
    if [[ ! -f "${log_file}" ]]; then
        die "no log at ${log_file}; has the broker been started with this --port/--data?"
    fi
    tail -n "${lines}" "${log_file}"
}

case "${cmd}" in
    fetch) cmd_fetch ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    logs) cmd_logs ;;
esac
