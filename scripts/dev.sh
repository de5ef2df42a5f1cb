#!/usr/bin/env bash
# Run wa-worker locally on its embedded reference proxy (README "Run it").
#   scripts/dev.sh --simulator   a simulated phone: no WhatsApp account, no internet
#   scripts/dev.sh               a real phone: scan the QR printed in the terminal
# Everything after the script name goes to `wa-worker dev` (see --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh
ensure_venv
exec "$VENV/bin/wa-worker" dev "$@"
