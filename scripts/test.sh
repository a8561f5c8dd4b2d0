#!/usr/bin/env bash
# The second command: the same set-up plus dev dependencies and the real provider CLIs, a PostgreSQL 15
# for the tests, then the quality gates: ruff check, ruff format --check, mypy --strict, pytest.
# Arguments go to pytest (e.g. scripts/test.sh -m "not browser" -x). Exits non-zero if any gate fails,
# and treats "pytest collected no tests" (exit 5) as a failure.
# Environment: BROWSERVM_STOP_POSTGRES=1 stops PostgreSQL at the end if this run started it (default
# under CI=true; elsewhere it keeps running, since another engineer's test run may be using it).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

log() { echo "test: $*" >&2; }

bash scripts/setup.sh --dev || exit 1
if [[ -f scripts/install-clis.sh ]]; then
    bash scripts/install-clis.sh || { log "scripts/install-clis.sh failed"; exit 1; }
fi
export VIRTUAL_ENV="$ROOT/.venv"
export PATH="$ROOT/.venv/bin:$PATH"

# --- the guest images the tests run: the browser image every process sandbox runs as its root, and the
# minimal one the VM tests boot. Cached outside the checkout with the download caches: unchanged, this
# is a no-op; a change of the agent's code rebuilds its last stage only (docs/image.md).
export BROWSERVM_CACHE="${BROWSERVM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/browservm}"
export BROWSERVM_TEST_IMAGE_DIR="${BROWSERVM_TEST_IMAGE_DIR:-$BROWSERVM_CACHE/test-images}"
export BROWSERVM_REQUIRE_IMAGE=1
for variant in browser minimal; do
    BROWSERVM_IMAGE_DIR="$BROWSERVM_TEST_IMAGE_DIR" browservm image build --variant "$variant" \
        || { log "the $variant guest image did not build"; exit 1; }
done

# --- PostgreSQL 15 for the store tests (started by hand: these hosts have no systemd)
readonly PG_VERSION=15 PG_CLUSTER=main PG_ROLE=browservm_test PG_DATABASE=browservm_test
as_postgres() {
    if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}
as_root() {
    if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi
}
cluster_field() {  # pg_lsclusters columns: Ver Cluster Port Status Owner Data-directory Log-file
    pg_lsclusters --no-header 2>/dev/null | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" -v f="$1" \
        '$1 == v && $2 == c { print $f }'
}
started_postgres=0
stop_postgres() {
    if [[ $started_postgres -eq 1 && "${BROWSERVM_STOP_POSTGRES:-${CI:-false}}" =~ ^(1|true)$ ]]; then
        log "stopping PostgreSQL $PG_VERSION/$PG_CLUSTER (this run started it)"
        as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" stop || true
    fi
}
trap stop_postgres EXIT

command -v pg_lsclusters >/dev/null || { log "PostgreSQL is not installed (apt-get install -y postgresql)"; exit 1; }
if [[ -z "$(cluster_field 2)" ]]; then
    log "creating PostgreSQL cluster $PG_VERSION/$PG_CLUSTER"
    as_root pg_createcluster "$PG_VERSION" "$PG_CLUSTER" >/dev/null || exit 1
fi
if [[ "$(cluster_field 4)" != "online" ]]; then
    log "starting PostgreSQL $PG_VERSION/$PG_CLUSTER"
    as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start || {
        log "PostgreSQL did not start; its log: $(cluster_field 7)"
        exit 1
    }
    started_postgres=1
fi
pg_port="$(cluster_field 3)"
# Idempotent: the role and database are created once and reused. The password only guards a test
# database on loopback.
as_postgres psql -p "$pg_port" -v ON_ERROR_STOP=1 -qtA >/dev/null <<SQL || { log "could not create the test role and database"; exit 1; }
DO \$\$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_ROLE') THEN
        CREATE ROLE $PG_ROLE LOGIN CREATEDB PASSWORD '$PG_ROLE';
    END IF;
END \$\$;
SELECT 'CREATE DATABASE $PG_DATABASE OWNER $PG_ROLE'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DATABASE') \gexec
SQL
# Over the unix socket: pytest runs in a network namespace of its own (tests/conftest.py), where the
# host's 127.0.0.1:5432 is not reachable. The role signs in there with its password, not as an OS user.
pg_hba="$(as_postgres psql -p "$pg_port" -qtA -c 'SHOW hba_file')"
hba_line="local all $PG_ROLE scram-sha-256"
if ! grep -qxF "$hba_line" "$pg_hba"; then
    log "allowing $PG_ROLE over the unix socket ($pg_hba)"
    as_root sed -i "0,/^local/s//$hba_line\n&/" "$pg_hba"
    as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" reload
fi
pg_socket="$(as_postgres psql -p "$pg_port" -qtA -c 'SHOW unix_socket_directories' | cut -d, -f1)"
export BROWSERVM_TEST_POSTGRES_URL="postgresql+asyncpg://$PG_ROLE:$PG_ROLE@/$PG_DATABASE?host=$pg_socket&port=$pg_port"
export BROWSERVM_REQUIRE_POSTGRES=1
log "PostgreSQL ready: ${BROWSERVM_TEST_POSTGRES_URL/:$PG_ROLE@/:***@}"

# --- quality gates: all run, so one report shows every failure
failed=()
gate() {
    local name=$1
    shift
    log "== $name"
    "$@"
    local status=$?
    if [[ $name == pytest && $status -eq 5 ]]; then
        log "pytest collected no tests: that is a failure here"
    fi
    [[ $status -eq 0 ]] || failed+=("$name (exit $status)")
}
gate "ruff check" ruff check .
gate "ruff format" ruff format --check .
gate mypy mypy
gate pytest pytest "$@"

if [[ ${#failed[@]} -gt 0 ]]; then
    log "FAILED: ${failed[*]}"
    exit 1
fi
log "all gates passed"
