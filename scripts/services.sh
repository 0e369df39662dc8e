#!/usr/bin/env bash
# Start the local services the real-stack tests and `card serve` use, when they are not running:
# pcscd with the vpcd driver ("Virtual PCD 00 00" on 127.0.0.1:35963), Mosquitto on 127.0.0.1:1883 and
# PostgreSQL on 127.0.0.1:5432 (user postgres, trust on loopback: a test server, not a production setup).
set -euo pipefail

has_vpcd_reader() {
  python3 - <<'PY' 2>/dev/null
import sys
from smartcard.System import readers
sys.exit(0 if any(str(r).startswith("Virtual PCD") for r in readers()) else 1)
PY
}

if ! pgrep -x pcscd >/dev/null; then
  pcscd
elif ! has_vpcd_reader; then
  # pcscd started before vsmartcard-vpcd was installed does not know the driver yet
  pkill -x pcscd || true
  sleep 0.5
  pcscd
fi
for _ in $(seq 50); do has_vpcd_reader && break; sleep 0.2; done
has_vpcd_reader || { echo "services: pcscd runs but shows no 'Virtual PCD' reader" >&2; exit 1; }

mqtt_round_trip() {
  # a retained message read back: the broker accepts, stores and delivers (a listening but stuck broker fails)
  local topic="yikatong-services/health-$$"
  timeout 5 mosquitto_pub -h 127.0.0.1 -p 1883 -q 1 -r -t "$topic" -m ok >/dev/null 2>&1 &&
    [ "$(timeout 5 mosquitto_sub -h 127.0.0.1 -p 1883 -t "$topic" -C 1 -W 4 2>/dev/null)" = ok ] &&
    timeout 5 mosquitto_pub -h 127.0.0.1 -p 1883 -q 1 -r -n -t "$topic" >/dev/null 2>&1
}
broker_state() {
  timeout 5 mosquitto_sub -h 127.0.0.1 -p 1883 -W 3 -C 4 -v -t '$SYS/broker/clients/total' \
    -t '$SYS/broker/clients/connected' -t '$SYS/broker/store/messages/count' -t '$SYS/broker/retained messages/count' \
    2>/dev/null | sed 's|^\$SYS/broker/||' | tr '\n' ' '
}
stop_broker() {
  pkill -x mosquitto || true
  for _ in $(seq 50); do pgrep -x mosquitto >/dev/null || break; sleep 0.2; done
  pkill -9 -x mosquitto || true
}
start_broker() {
  mosquitto -d -c /etc/mosquitto/mosquitto.conf
  for _ in $(seq 50); do mqtt_round_trip && break; sleep 0.2; done
}
if ! (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
  mosquitto -d -c /etc/mosquitto/mosquitto.conf
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null && break; sleep 0.2; done
fi
if [ "${CI:-}" = true ] && [ -z "${YIKATONG_KEEP_BROKER:-}" ]; then
  # CI runs on the machine as the last session left it: retained hotlists, sessions and queues of earlier runs
  # on the machine's broker (its store persists) would change what the tests see. Start it from an empty store.
  echo "services: CI: the machine's Mosquitto held $(broker_state)"
  store=$(awk '$1 == "persistence_location" {print $2}' /etc/mosquitto/mosquitto.conf)
  stop_broker
  rm -f "${store:-/var/lib/mosquitto/}mosquitto.db"
  start_broker
  echo "services: CI: the machine's Mosquitto restarted with an empty store"
fi
if ! mqtt_round_trip; then
  echo "services: Mosquitto on 127.0.0.1:1883 listens but did not deliver a message within 5 s: restarting it" >&2
  stop_broker
  start_broker
  mqtt_round_trip || { echo "services: Mosquitto on 127.0.0.1:1883 does not deliver messages" >&2; exit 1; }
fi
pg_ok() { psql -h 127.0.0.1 -U postgres -d postgres -tAc "select 1" >/dev/null 2>&1; }
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
  for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
if ! pg_ok; then
  # a freshly installed Debian PostgreSQL asks for passwords on TCP: let the local test clients in
  hba=$(ls /etc/postgresql/*/main/pg_hba.conf | sort -V | tail -1)
  sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main reload
  sleep 0.5
fi
pg_ok || { echo "services: PostgreSQL on 127.0.0.1:5432 does not let user postgres in" >&2; exit 1; }
echo "services: pcscd with vpcd, mosquitto on 127.0.0.1:1883, postgresql on 127.0.0.1:5432"
