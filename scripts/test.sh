#!/usr/bin/env bash
# The test suite (slow end-to-end tests included). Extra arguments go to pytest, e.g. -m "not slow".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
