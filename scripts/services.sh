#!/usr/bin/env bash
# Start the local services the real-stack tests and `card serve` use, when they are not running:
# pcscd with the vpcd driver ("Virtual PCD 00 00" on 127.0.0.1:35963) and Mosquitto on 127.0.0.1:1883.
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

if ! (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
  mosquitto -d -c /etc/mosquitto/mosquitto.conf
fi
echo "services: pcscd with vpcd, mosquitto on 127.0.0.1:1883"
