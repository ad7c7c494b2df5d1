#!/usr/bin/env bash
# Real test services on loopback for lockstep's integration tests:
#   * Apache Kafka 4.x, one node in KRaft mode (broker + controller), jars fetched from Maven Central
#     with mvn (scripts/kafka-pom.xml) into a cache dir, run with java; transactions work (RF=1).
#   * Redis (Debian's redis-server, installed with apt-get when missing).
#
# Usage: scripts/services.sh start|stop|status|env|check|clean|logs
#   start   fetch what is missing, start both (idempotent: a running service is left alone), wait until
#           both answer, then print on stdout the lines
#             KAFKA_BROKERS=127.0.0.1:<port>
#             REDIS_URL=redis://127.0.0.1:<port>
#           Every other message goes to stderr, so `eval "$(scripts/services.sh start)"` works
#           (add `export` yourself, or use `set -a`).
#           Kafka starts from empty storage each time it is not already running: it holds only test
#           topics, and a broker that must first load thousands of old test partitions takes minutes
#           to answer. A running broker whose data has grown past KAFKA_MAX_PARTITIONS partitions is
#           restarted empty for the same reason. Set LOCKSTEP_KEEP_KAFKA_DATA=1 to keep the data.
#   stop    stop both (SIGTERM by pid, wait, SIGKILL after a timeout).
#   status  print each service's state; exit 1 if one is down.
#   env     print the two lines above (without checking anything).
#   check   smoke test against the running services: redis SET/GET, and a Kafka transactional
#           produce (commit + abort) read back with isolation.level=read_committed.
#   clean   stop, then delete the run dir (Kafka data, logs, pid files). The jar cache is kept.
#   logs    print the tail of both logs.
#
# Environment (defaults):
#   KAFKA_VERSION=4.4.0            Kafka version fetched from Maven Central
#   KAFKA_PORT=19092               PLAINTEXT listener (clients)
#   KAFKA_CONTROLLER_PORT=19093    KRaft controller listener
#   REDIS_PORT=16379
#   LOCKSTEP_CACHE=$HOME/.cache/lockstep   jars go to $LOCKSTEP_CACHE/kafka/<version>/libs
#   LOCKSTEP_RUN=/tmp/lockstep-services    pid files, logs, configs, Kafka data
#   KAFKA_START_TIMEOUT=90, REDIS_START_TIMEOUT=20 (seconds)
#   KAFKA_MAX_PARTITIONS=2000      partitions a running broker may hold before `start` empties it
#   LOCKSTEP_KEEP_KAFKA_DATA=      1: `start` keeps the broker's data
# Everything binds to 127.0.0.1 only.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

KAFKA_VERSION="${KAFKA_VERSION:-4.4.0}"
KAFKA_PORT="${KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-19093}"
REDIS_PORT="${REDIS_PORT:-16379}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
REDIS_START_TIMEOUT="${REDIS_START_TIMEOUT:-20}"
KAFKA_MAX_PARTITIONS="${KAFKA_MAX_PARTITIONS:-2000}"
KEEP_KAFKA_DATA="${LOCKSTEP_KEEP_KAFKA_DATA:-}"
HOST=127.0.0.1

CACHE_ROOT="${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}"
KAFKA_CACHE="$CACHE_ROOT/kafka/$KAFKA_VERSION"
KAFKA_LIBS="$KAFKA_CACHE/libs"
KAFKA_POM_SRC="$SCRIPT_DIR/kafka-pom.xml"

RUN_DIR="${LOCKSTEP_RUN:-/tmp/lockstep-services}"
KAFKA_RUN="$RUN_DIR/kafka"
KAFKA_DATA="$KAFKA_RUN/data"
KAFKA_PID="$KAFKA_RUN/kafka.pid"
KAFKA_LOG="$KAFKA_RUN/kafka.log"
KAFKA_PROPS="$KAFKA_RUN/server.properties"
KAFKA_LOG4J="$KAFKA_RUN/log4j2-broker.properties"
TOOLS_LOG4J="$KAFKA_RUN/log4j2-tools.properties"
REDIS_RUN="$RUN_DIR/redis"
REDIS_PID="$REDIS_RUN/redis.pid"
REDIS_LOG="$REDIS_RUN/redis.log"

# Marks our JVM's command line, so a recycled pid is never taken for our broker.
KAFKA_MARK="-Dlockstep.service=kafka"

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
}

now() { date +%s; }

# True if something accepts TCP connections on 127.0.0.1:$1.
port_open() {
  (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

# Prints the pid from pid file $1 if that process is alive and its command line contains $2.
live_pid() {
  local file="$1" needle="$2" pid
  [[ -s "$file" ]] || return 1
  pid="$(tr -dc '0-9' <"$file")"
  [[ -n "$pid" ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$needle" || return 1
  printf '%s\n' "$pid"
}

# Sends SIGTERM to $1, waits up to $2 s, then SIGKILL.
stop_pid() {
  local pid="$1" wait_s="$2" name="$3" t0
  kill -TERM "$pid" 2>/dev/null || return 0
  t0="$(now)"
  while kill -0 "$pid" 2>/dev/null; do
    if (( $(now) - t0 >= wait_s )); then
      log "$name (pid $pid) still running after ${wait_s}s: sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.3
  done
}

# Serialise concurrent invocations (e.g. parallel test jobs calling `start`). The lock is fd 9;
# the daemons are started with 9>&- so that they do not inherit (and hold) it.
take_lock() {
  mkdir -p "$RUN_DIR"
  exec 9>"$RUN_DIR/.lock"
  if ! flock -n 9; then
    log "another scripts/services.sh holds $RUN_DIR/.lock: waiting (up to 180 s)"
    flock -w 180 9 || die "could not lock $RUN_DIR/.lock within 180 s (holders: $(fuser "$RUN_DIR/.lock" 2>/dev/null || echo unknown))"
  fi
}

# ---------------------------------------------------------------- Kafka

java_cp() { printf '%s/*' "$KAFKA_LIBS"; }

check_java() {
  command -v java >/dev/null || die "java not found: Kafka $KAFKA_VERSION needs Java 17+ (apt-get install openjdk-17-jre-headless)"
  local v
  v="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)"
  [[ -n "$v" && "$v" -ge 17 ]] || die "Java 17+ needed for Kafka $KAFKA_VERSION, found: $(java -version 2>&1 | head -n1)"
}

kafka_stamp() {
  { printf 'kafka.version=%s\n' "$KAFKA_VERSION"; cat "$KAFKA_POM_SRC"; } | sha256sum | cut -c1-16
}

fetch_kafka() {
  [[ -f "$KAFKA_POM_SRC" ]] || die "missing $KAFKA_POM_SRC"
  local stamp
  stamp="$(kafka_stamp)"
  if [[ -f "$KAFKA_LIBS/.complete" && "$(cat "$KAFKA_LIBS/.complete")" == "$stamp" ]] &&
     compgen -G "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null; then
    return 0
  fi
  command -v mvn >/dev/null || die "mvn not found: needed once to fetch Kafka $KAFKA_VERSION from Maven Central (apt-get install maven)"
  log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_LIBS ..."
  local t0 tmp mvn_log
  t0="$(now)"
  mkdir -p "$KAFKA_CACHE"
  tmp="$(mktemp -d "$KAFKA_CACHE/fetch.XXXXXX")"
  cp "$KAFKA_POM_SRC" "$tmp/pom.xml"
  mvn_log="$tmp/mvn.log"
  if ! (cd "$tmp" && mvn -B -q -Dstyle.color=never -Dkafka.version="$KAFKA_VERSION" \
          dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp/libs") \
        >"$mvn_log" 2>&1; then
    sed "s/\x1b\[[0-9;]*m//g" "$mvn_log" >&2
    rm -rf "$tmp"
    die "mvn could not fetch Kafka $KAFKA_VERSION (output above; pom: $KAFKA_POM_SRC)"
  fi
  if [[ ! -f "$tmp/libs/kafka_2.13-$KAFKA_VERSION.jar" ]]; then
    sed "s/\x1b\[[0-9;]*m//g" "$mvn_log" >&2
    rm -rf "$tmp"
    die "mvn succeeded but kafka_2.13-$KAFKA_VERSION.jar is missing"
  fi
  printf '%s\n' "$stamp" >"$tmp/libs/.complete"
  rm -rf "$KAFKA_LIBS"
  mv "$tmp/libs" "$KAFKA_LIBS"
  rm -rf "$tmp"
  log "fetched $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars ($(du -sh "$KAFKA_LIBS" | cut -f1)) in $(( $(now) - t0 ))s"
}

write_kafka_config() {
  mkdir -p "$KAFKA_RUN" "$KAFKA_DATA"
  cat >"$KAFKA_PROPS" <<EOF
# Written by scripts/services.sh: single-node KRaft (broker + controller) on loopback only.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$KAFKA_DATA
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=true
delete.topic.enable=true
# single node: internal topics with one replica, few partitions (fast first use)
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# small footprint for a 2-core test machine
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
background.threads=2
log.segment.bytes=16777216
log.retention.hours=24
log.retention.check.interval.ms=60000
EOF
  cat >"$KAFKA_LOG4J" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = info
logger.state.name = state.change.logger
logger.state.level = warn
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.controller.name = org.apache.kafka.controller
logger.controller.level = info
EOF
  cat >"$TOOLS_LOG4J" <<'EOF'
status = error
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.err.ref = STDERR
EOF
}

# Runs a Kafka CLI main class from the cached jars, quietly logged (used by wait/check).
kafka_tool() {
  java -Xmx256m -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$TOOLS_LOG4J" -cp "$(java_cp)" "$@"
}

format_kafka_storage() {
  # Formatted directories are not forward-compatible: reformat when the Kafka version changed.
  if [[ -f "$KAFKA_DATA/meta.properties" ]]; then
    if [[ "$(cat "$KAFKA_RUN/formatted-by" 2>/dev/null)" == "$KAFKA_VERSION" ]]; then
      return 0
    fi
    log "Kafka data in $KAFKA_DATA was formatted by another version: wiping it"
    rm -rf "$KAFKA_DATA"
    mkdir -p "$KAFKA_DATA"
  fi
  local cluster_id out
  cluster_id="$(kafka_tool kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1 | tr -d '[:space:]')"
  [[ "$cluster_id" =~ ^[A-Za-z0-9_-]{22}$ ]] || die "kafka.tools.StorageTool random-uuid printed no cluster id (got '$cluster_id')"
  log "formatting Kafka storage $KAFKA_DATA (cluster id $cluster_id)"
  if ! out="$(kafka_tool kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_PROPS" 2>&1)"; then
    printf '%s\n' "$out" >&2
    die "kafka.tools.StorageTool format failed"
  fi
  printf '%s\n' "$KAFKA_VERSION" >"$KAFKA_RUN/formatted-by"
}

kafka_ready() {
  port_open "$KAFKA_PORT" || return 1
  timeout 30 java -Xmx128m -XX:TieredStopAtLevel=1 -Dlog4j2.configurationFile="$TOOLS_LOG4J" \
    -cp "$(java_cp)" org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "$HOST:$KAFKA_PORT" --list >/dev/null 2>&1
}

# Number of partition directories in the broker's data (each topic partition is one).
kafka_partitions() {
  find "$KAFKA_DATA" -mindepth 1 -maxdepth 1 -type d -name '*-[0-9]*' 2>/dev/null | wc -l
}

# Empties the broker's storage (it is formatted again before the start), unless asked to keep it.
empty_kafka_data() {
  [[ -z "$KEEP_KAFKA_DATA" ]] || return 0
  [[ -d "$KAFKA_DATA" ]] || return 0
  log "kafka: emptying $KAFKA_DATA ($(kafka_partitions) partitions of earlier runs; LOCKSTEP_KEEP_KAFKA_DATA=1 keeps them)"
  rm -rf "$KAFKA_DATA"
}

start_kafka() {
  local pid partitions
  if pid="$(live_pid "$KAFKA_PID" "$KAFKA_MARK")"; then
    partitions="$(kafka_partitions)"
    if [[ -z "$KEEP_KAFKA_DATA" ]] && (( partitions > KAFKA_MAX_PARTITIONS )); then
      log "kafka: running (pid $pid) with $partitions partitions, more than KAFKA_MAX_PARTITIONS=$KAFKA_MAX_PARTITIONS: restarting it empty"
      stop_kafka
    else
      log "kafka: already running (pid $pid) on $HOST:$KAFKA_PORT"
      # Still make sure it answers (it may have been started a moment ago by another caller).
      wait_kafka "$pid"
      return 0
    fi
  fi
  rm -f "$KAFKA_PID"
  port_open "$KAFKA_PORT" && die "port $HOST:$KAFKA_PORT is taken by another process (not our Kafka); set KAFKA_PORT"
  port_open "$KAFKA_CONTROLLER_PORT" && die "port $HOST:$KAFKA_CONTROLLER_PORT is taken by another process; set KAFKA_CONTROLLER_PORT"
  check_java
  fetch_kafka
  empty_kafka_data
  write_kafka_config
  format_kafka_storage
  log "kafka: starting Kafka $KAFKA_VERSION on $HOST:$KAFKA_PORT (controller $HOST:$KAFKA_CONTROLLER_PORT), log $KAFKA_LOG"
  : >"$KAFKA_LOG"
  # setsid: own session, so the caller's Ctrl-C or process-group kill does not take the broker down.
  setsid nohup java -Xms256m -Xmx512m "$KAFKA_MARK" \
    -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
    -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$KAFKA_LOG4J" -Dkafka.logs.dir="$KAFKA_RUN" \
    -cp "$(java_cp)" kafka.Kafka "$KAFKA_PROPS" \
    >>"$KAFKA_LOG" 2>&1 </dev/null 9>&- &
  pid=$!
  printf '%s\n' "$pid" >"$KAFKA_PID"
  wait_kafka "$pid"
}

wait_kafka() {
  local pid="$1" t0
  t0="$(now)"
  until kafka_ready; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "kafka: process $pid exited during start-up; last lines of $KAFKA_LOG:"
      tail -n 40 "$KAFKA_LOG" >&2 || true
      rm -f "$KAFKA_PID"
      die "Kafka did not start"
    fi
    if (( $(now) - t0 >= KAFKA_START_TIMEOUT )); then
      log "kafka: no answer on $HOST:$KAFKA_PORT after ${KAFKA_START_TIMEOUT}s; last lines of $KAFKA_LOG:"
      tail -n 40 "$KAFKA_LOG" >&2 || true
      die "Kafka did not become ready (still running as pid $pid; 'scripts/services.sh stop' ends it)"
    fi
    sleep 1
  done
  log "kafka: ready on $HOST:$KAFKA_PORT (pid $pid, $(( $(now) - t0 ))s)"
}

stop_kafka() {
  local pid
  if pid="$(live_pid "$KAFKA_PID" "$KAFKA_MARK")"; then
    log "kafka: stopping pid $pid"
    stop_pid "$pid" 60 kafka
    log "kafka: stopped"
  else
    log "kafka: not running"
  fi
  rm -f "$KAFKA_PID"
}

# ---------------------------------------------------------------- Redis

ensure_redis() {
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    return 0
  fi
  [[ "$(id -u)" -eq 0 ]] || die "redis-server is not installed and this is not root: run 'sudo apt-get install -y redis-server'"
  command -v apt-get >/dev/null || die "redis-server is not installed and apt-get is not available"
  log "installing redis-server with apt-get ..."
  local out
  if ! out="$( { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server; } 2>&1)"; then
    printf '%s\n' "$out" | tail -n 30 >&2
    die "apt-get install redis-server failed"
  fi
  command -v redis-server >/dev/null || die "redis-server still not on PATH after apt-get install"
  command -v redis-cli >/dev/null || die "redis-cli still not on PATH after apt-get install"
}

redis_ready() {
  [[ "$(timeout 5 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == "PONG" ]]
}

start_redis() {
  local pid t0
  ensure_redis
  mkdir -p "$REDIS_RUN"
  if pid="$(live_pid "$REDIS_PID" "redis-server")"; then
    log "redis: already running (pid $pid) on $HOST:$REDIS_PORT"
  else
    rm -f "$REDIS_PID"
    port_open "$REDIS_PORT" && die "port $HOST:$REDIS_PORT is taken by another process (not our Redis); set REDIS_PORT"
    log "redis: starting on $HOST:$REDIS_PORT, log $REDIS_LOG"
    if ! redis-server --port "$REDIS_PORT" --bind "$HOST" --protected-mode yes \
           --daemonize yes --pidfile "$REDIS_PID" --logfile "$REDIS_LOG" --dir "$REDIS_RUN" \
           --save '' --appendonly no 9>&-; then
      tail -n 20 "$REDIS_LOG" >&2 || true
      die "redis-server failed to start"
    fi
  fi
  t0="$(now)"
  until redis_ready; do
    if (( $(now) - t0 >= REDIS_START_TIMEOUT )); then
      log "redis: no PONG on $HOST:$REDIS_PORT after ${REDIS_START_TIMEOUT}s; last lines of $REDIS_LOG:"
      tail -n 20 "$REDIS_LOG" >&2 || true
      die "Redis did not become ready"
    fi
    sleep 0.2
  done
  pid="$(live_pid "$REDIS_PID" "redis-server")" || die "redis answers on $HOST:$REDIS_PORT but $REDIS_PID names no live redis-server"
  log "redis: ready on $HOST:$REDIS_PORT (pid $pid)"
}

stop_redis() {
  local pid
  if pid="$(live_pid "$REDIS_PID" "redis-server")"; then
    log "redis: stopping pid $pid"
    stop_pid "$pid" 20 redis
    log "redis: stopped"
  else
    log "redis: not running"
  fi
  rm -f "$REDIS_PID"
}

# ---------------------------------------------------------------- commands

print_env() {
  printf 'KAFKA_BROKERS=%s:%s\n' "$HOST" "$KAFKA_PORT"
  printf 'REDIS_URL=redis://%s:%s\n' "$HOST" "$REDIS_PORT"
}

# Before starting anything: a port of a service that is not running must be free.
preflight_ports() {
  if ! live_pid "$KAFKA_PID" "$KAFKA_MARK" >/dev/null; then
    port_open "$KAFKA_PORT" && die "port $HOST:$KAFKA_PORT is taken by another process (not our Kafka); set KAFKA_PORT"
    port_open "$KAFKA_CONTROLLER_PORT" && die "port $HOST:$KAFKA_CONTROLLER_PORT is taken by another process; set KAFKA_CONTROLLER_PORT"
  fi
  if ! live_pid "$REDIS_PID" "redis-server" >/dev/null; then
    port_open "$REDIS_PORT" && die "port $HOST:$REDIS_PORT is taken by another process (not our Redis); set REDIS_PORT"
  fi
  return 0
}

cmd_start() {
  take_lock
  local t0
  t0="$(now)"
  preflight_ports
  start_redis
  start_kafka
  log "all services up ($(( $(now) - t0 ))s)"
  print_env
}

cmd_stop() {
  take_lock
  stop_kafka
  stop_redis
}

cmd_status() {
  local down=0 pid
  if pid="$(live_pid "$KAFKA_PID" "$KAFKA_MARK")"; then
    if port_open "$KAFKA_PORT"; then
      echo "kafka: running (pid $pid) on $HOST:$KAFKA_PORT, Kafka $KAFKA_VERSION"
    else
      echo "kafka: process $pid alive but $HOST:$KAFKA_PORT not accepting connections (starting or broken; see $KAFKA_LOG)"
      down=1
    fi
  else
    echo "kafka: stopped"
    down=1
  fi
  if pid="$(live_pid "$REDIS_PID" "redis-server")"; then
    if command -v redis-cli >/dev/null && redis_ready; then
      echo "redis: running (pid $pid) on $HOST:$REDIS_PORT"
    else
      echo "redis: process $pid alive but no PONG on $HOST:$REDIS_PORT (see $REDIS_LOG)"
      down=1
    fi
  else
    echo "redis: stopped"
    down=1
  fi
  return "$down"
}

cmd_check() {
  cmd_status >&2 || die "services are not all running: run 'scripts/services.sh start' first"
  local key="lockstep:services:check:$$" got
  redis-cli -h "$HOST" -p "$REDIS_PORT" set "$key" ok EX 60 >/dev/null
  got="$(redis-cli -h "$HOST" -p "$REDIS_PORT" get "$key")"
  [[ "$got" == "ok" ]] || die "redis: SET/GET returned '$got'"
  redis-cli -h "$HOST" -p "$REDIS_PORT" del "$key" >/dev/null
  log "redis: SET/GET ok"

  # Transactional producer: commit 3 records, abort 2, then a read_committed consumer must see
  # exactly the 3 committed ones. Java single-file source run against the cached kafka-clients.
  local src="$KAFKA_RUN/TxnCheck.java"
  cat >"$src" <<'EOF'
import java.time.Duration;
import java.util.*;
import org.apache.kafka.clients.admin.*;
import org.apache.kafka.clients.consumer.*;
import org.apache.kafka.clients.producer.*;
import org.apache.kafka.common.serialization.*;

public class TxnCheck {
  public static void main(String[] args) throws Exception {
    String bootstrap = args[0];
    String topic = "lockstep-services-check-" + System.currentTimeMillis();
    Properties a = new Properties();
    a.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    try (Admin admin = Admin.create(a)) {
      admin.createTopics(List.of(new NewTopic(topic, 1, (short) 1))).all().get();
    }
    Properties p = new Properties();
    p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    p.put(ProducerConfig.TRANSACTIONAL_ID_CONFIG, "lockstep-services-check");
    p.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
    p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
    p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
    try (KafkaProducer<String, String> producer = new KafkaProducer<>(p)) {
      producer.initTransactions();
      producer.beginTransaction();
      for (int i = 0; i < 3; i++) producer.send(new ProducerRecord<>(topic, "k" + i, "committed-" + i));
      producer.commitTransaction();
      producer.beginTransaction();
      for (int i = 0; i < 2; i++) producer.send(new ProducerRecord<>(topic, "k" + i, "aborted-" + i));
      producer.flush();
      producer.abortTransaction();
    }
    Properties c = new Properties();
    c.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    c.put(ConsumerConfig.GROUP_ID_CONFIG, "lockstep-services-check");
    c.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
    c.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
    c.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
    c.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
    List<String> seen = new ArrayList<>();
    try (KafkaConsumer<String, String> consumer = new KafkaConsumer<>(c)) {
      consumer.subscribe(List.of(topic));
      long deadline = System.currentTimeMillis() + 30_000;
      while (seen.size() < 3 && System.currentTimeMillis() < deadline) {
        for (ConsumerRecord<String, String> r : consumer.poll(Duration.ofMillis(500))) seen.add(r.value());
      }
      // a little longer, so that aborted records would show up if isolation were broken
      for (ConsumerRecord<String, String> r : consumer.poll(Duration.ofMillis(1000))) seen.add(r.value());
      consumer.commitSync();
    }
    try (Admin admin = Admin.create(a)) {
      admin.deleteTopics(List.of(topic)).all().get();
    }
    List<String> want = List.of("committed-0", "committed-1", "committed-2");
    if (!seen.equals(want)) {
      System.err.println("read_committed consumer saw " + seen + ", expected " + want);
      System.exit(1);
    }
    System.out.println("kafka: transactional produce (commit + abort) and read_committed consume ok on topic " + topic);
  }
}
EOF
  kafka_tool "$src" "$HOST:$KAFKA_PORT" >&2 || die "kafka: transaction check failed"
  log "check passed"
}

cmd_clean() {
  cmd_stop
  take_lock
  log "removing $KAFKA_RUN and $REDIS_RUN"
  rm -rf "$KAFKA_RUN" "$REDIS_RUN"
}

cmd_logs() {
  echo "== $KAFKA_LOG"; tail -n 40 "$KAFKA_LOG" 2>/dev/null || echo "(none)"
  echo "== $REDIS_LOG"; tail -n 20 "$REDIS_LOG" 2>/dev/null || echo "(none)"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) print_env ;;
  check) cmd_check ;;
  clean) cmd_clean ;;
  logs) cmd_logs ;;
  -h|--help|help) usage ;;
  *) usage; exit 2 ;;
esac
