#!/usr/bin/env bash
# Install the system packages trio_vhost's tests and examples need (Debian 12).
# Idempotent; runs as root in CI, and via sudo when available elsewhere.
set -euo pipefail

need=()
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv' 2>/dev/null || need+=(python3-venv)

if [ "${#need[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
