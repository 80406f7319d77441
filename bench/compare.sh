#!/usr/bin/env bash
# Peer comparison: the same loadgen scenario against Mosquitto (Debian's package, QoS 1,
# persistent sessions, one topic per device) and against the relay (durability fsync, its
# default, and memory, Mosquitto's level here), at the same fixed rate; prints one Markdown
# table side by side. Mosquitto runs without TLS; the relay always speaks TLS 1.3.
#
#   bench/compare.sh                       # 5,000 msg/s for 20 s
#   RATE=10000 DURATION=30 bench/compare.sh
#   bench/compare.sh --users 2000          # extra arguments go to both loadgen runs
#
# Installs Mosquitto if it is missing (apt-get; needs root), starts it on 127.0.0.1:1883
# with the configuration below, stops it at the end. The relay is started by loadgen
# (--spawn). Reports are kept in $OUT (default: a temporary directory, printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

RATE=${RATE:-5000}
DURATION=${DURATION:-20}
PORT=${MQTT_PORT:-1883}
OUT=${OUT:-$(mktemp -d /tmp/a7-compare.XXXXXX)}
mkdir -p "$OUT"

cargo build --release -p relay -p loadgen
LOADGEN=target/release/loadgen

MOSQUITTO=$(command -v mosquitto || true)
[ -z "$MOSQUITTO" ] && [ -x /usr/sbin/mosquitto ] && MOSQUITTO=/usr/sbin/mosquitto
if [ -z "$MOSQUITTO" ]; then
  echo "compare.sh: installing mosquitto (Debian package)" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  MOSQUITTO=/usr/sbin/mosquitto
fi
# The package may have started a system-wide broker on 1883; ours runs with our settings.
if command -v systemctl >/dev/null && systemctl is-active --quiet mosquitto 2>/dev/null; then
  systemctl stop mosquitto || true
elif command -v service >/dev/null; then
  service mosquitto stop >/dev/null 2>&1 || true
fi

# The settings that make Mosquitto a fair peer: nothing dropped silently (its default
# max_queued_messages 1000 drops for slow subscribers), no Nagle delay, no disk
# (the relay's durability here is memory too), a deeper in-flight window per client (the
# relay allows 256 unacknowledged deliveries per device).
cat > "$OUT/mosquitto.conf" <<CONF
listener $PORT 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 1000000
max_queued_bytes 0
max_inflight_messages 1000
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
CONF
"$MOSQUITTO" -c "$OUT/mosquitto.conf" 2>"$OUT/mosquitto.log" &
MOSQUITTO_PID=$!
trap 'kill "$MOSQUITTO_PID" 2>/dev/null || true; wait "$MOSQUITTO_PID" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.1
done

COMMON=(--rate "$RATE" --duration "$DURATION" "$@")
status=0
echo "== mosquitto: ${COMMON[*]}" >&2
"$LOADGEN" --target "mqtt://127.0.0.1:$PORT" "${COMMON[@]}" --json "$OUT/mosquitto.json" --html "$OUT/mosquitto.html" || status=$?
echo "== relay, durability fsync (its default): ${COMMON[*]}" >&2
"$LOADGEN" --spawn "${COMMON[@]}" --json "$OUT/relay.json" --html "$OUT/relay.html" || status=$?
echo "== relay, durability memory (Mosquitto's level here): ${COMMON[*]}" >&2
"$LOADGEN" --spawn --relay-durability memory "${COMMON[@]}" --json "$OUT/relay-memory.json" \
  --html "$OUT/relay-memory.html" || status=$?

echo
echo "Same scenario, $RATE msg/s offered for $DURATION s, on $(nproc) cores ($(uname -r)):"
echo
"$LOADGEN" compare "relay (TLS, fsync)=$OUT/relay.json" "relay (TLS, memory)=$OUT/relay-memory.json" \
  "mosquitto (TCP, memory)=$OUT/mosquitto.json"
echo
echo "reports: $OUT (loadgen exit statuses: last non-zero $status)"
