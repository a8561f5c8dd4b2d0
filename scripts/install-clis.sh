#!/usr/bin/env bash
# Install the pinned provider CLIs (Claude Code, Codex, Gemini CLI) from npm into a cache directory outside
# the repository. Idempotent: a second run with the same pins does nothing. The login runner finds the
# binaries in "$DIR/node_modules/.bin" (override with BROWSERVM_CLI_DIR).
set -euo pipefail

DIR="${BROWSERVM_CLI_DIR:-${BROWSERVM_CACHE:-$HOME/.cache/browservm}/clis}"
# The pins are the guest image's: one list for both (browservm image build installs the same).
PIN_FILE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/browservm/sandbox/image/files/cli-pins.txt"
mapfile -t PINS < <(grep -v -e '^#' -e '^[[:space:]]*$' "$PIN_FILE")
[[ ${#PINS[@]} -gt 0 ]] || { echo "install-clis: no pins in $PIN_FILE" >&2; exit 1; }

command -v npm >/dev/null || { echo "install-clis: npm not found; install nodejs (>= 20) and npm first" >&2; exit 1; }
mkdir -p "$DIR"
STAMP="$DIR/.installed"
WANT="$(printf '%s\n' "${PINS[@]}")"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    for bin in claude codex gemini; do
        [[ -x "$DIR/node_modules/.bin/$bin" ]] || { rm -f "$STAMP"; break; }
    done
    if [[ -f "$STAMP" ]]; then
        echo "install-clis: already installed in $DIR"
        exit 0
    fi
fi

# A private package.json keeps npm from walking up into some other project.
[[ -f "$DIR/package.json" ]] || echo '{"name": "browservm-clis", "private": true}' > "$DIR/package.json"
npm install --prefix "$DIR" --no-audit --no-fund --save-exact "${PINS[@]}"
for bin in claude codex gemini; do
    [[ -x "$DIR/node_modules/.bin/$bin" ]] || { echo "install-clis: $bin missing after npm install" >&2; exit 1; }
done
printf '%s\n' "$WANT" > "$STAMP"
echo "install-clis: installed in $DIR:"
printf '  %s\n' "${PINS[@]}"
