#!/usr/bin/env bash
# The first command: install what is missing (idempotent, ~0.3 s when nothing changed), then run the
# controller on 127.0.0.1:8080 with SQLite in the state dir and the process backend. Arguments go to
# `browservm serve`; settings come from BROWSERVM_* variables (see README.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/browservm" serve "$@"
