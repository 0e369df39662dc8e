#!/usr/bin/env bash
# Start, stop or show a 3-node NATS cluster on loopback (JetStream + MQTT 3.1.1) for trying the terminals and
# the clearing against NATS by hand; configs, logs and stores live in DIR (default run/nats-cluster; a relative
# DIR is taken from the repo root).
#   bash scripts/nats-cluster.sh start|stop|status [DIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
[ $# -ge 1 ] || { echo "usage: $0 start|stop|status [DIR]" >&2; exit 2; }
command="$1"
folder="${2:-run/nats-cluster}"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m yikatong.nats_cluster --folder "$folder" "$command"
