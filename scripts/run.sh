#!/usr/bin/env bash
# The first command: install what is missing (idempotent, ~0.3 s when nothing changed), build the guest
# image if it is not built yet (a few minutes the first time, ~1 s after: see docs/image.md), then run the
# controller on 127.0.0.1:8080 with SQLite in the state dir and the process backend. Arguments go to
# `browservm serve`; settings come from BROWSERVM_* variables (see README.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
if [[ $EUID -eq 0 ]]; then
    "$ROOT/.venv/bin/browservm" image build --variant browser
else
    # mmdebstrap installs the tree's packages as root; the process backend does not need the image yet.
    echo "run: not root, so the guest image is not built; as root: .venv/bin/browservm image build" >&2
fi
exec "$ROOT/.venv/bin/browservm" serve "$@"
