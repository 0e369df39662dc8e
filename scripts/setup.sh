#!/usr/bin/env bash
# Install everything yikatong needs on a fresh Debian/Ubuntu machine, then yikatong itself (editable,
# with the test tools). Safe to run again: it installs only what is missing.
#   system: pcscd + vsmartcard-vpcd (the virtual PC/SC reader), mosquitto (+ clients), PostgreSQL (the
#           clearing's scale-out database), and what pyscard builds against (swig, libpcsclite-dev, a C compiler)
#           pcsc-tools (pcsc_scan, scriptor) and libnfc-bin (nfc-list, nfc-mfclassic): outside clients of the M1 readers
#           nats-server: the 3-node loopback NATS cluster (scripts/nats-cluster.sh, `--cluster` runs)
#   python: this repo with its [test] extras (pyserial for PN532 boards among them)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(pcscd vsmartcard-vpcd libpcsclite-dev swig mosquitto mosquitto-clients postgresql gcc chromium pcsc-tools libnfc-bin nats-server)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"
command -v pyenv >/dev/null && pyenv rehash 2>/dev/null || true  # console script shim under pyenv
bash scripts/services.sh
echo "setup: done ($(command -v yikatong))"
