#!/usr/bin/env bash
# The main job: Fashion-MNIST demo (dense teacher vs DynamicViT). Extra arguments go to `dynamicvit demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$VENV/bin/dynamicvit" demo "$@"
