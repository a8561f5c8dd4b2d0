"""``browservm doctor``: is this host able to run browservm, and if not, what to do about it.

Each check looks at the real thing (runs the binary, opens the database, writes a file in the state dir)
and answers with a :class:`Check`: what it found, and for anything missing the command that fixes it.
A check marked not ``required`` describes the host (KVM, QEMU under the process backend) without making
the doctor fail. Checks never raise: a check that crashes is reported as a failed check.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from browservm.sandbox.image.recipe import Variant
from browservm.settings import Settings

NOVNC_DIR = Path(__file__).parent / "web" / "static" / "vendor" / "novnc"
MIN_FREE_BYTES = 2 * 1024**3
"""A browser sandbox's profile, overlay and logs stay well under this; below it sessions start failing."""

_SETUP = "scripts/setup.sh (from the checkout)"
_PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    """What was found: a version, a path, or what is wrong."""
    fix: str = ""
    """The command or step that makes the check pass; empty when ``ok``."""
    required: bool = True
    """False for facts about the host that limit browservm without stopping it (no hardware KVM)."""


def run(settings: Settings) -> list[Check]:
    """Every check, in the order an operator would fix them. Safe to call with no event loop running."""
    return asyncio.run(run_async(settings))


async def run_async(settings: Settings) -> list[Check]:
    """The same checks, concurrently: each probe runs in a thread, the database on this loop."""
    local: list[tuple[str, Callable[[], Check]]] = [
        ("state_dir", lambda: check_state_dir(settings.state_dir)),
        ("disk", lambda: check_disk_space(settings.state_dir)),
        ("kvm", check_kvm),
        ("qemu", lambda: check_qemu(required=settings.backend == "qemu", settings=settings)),
        ("firecracker", lambda: check_firecracker(settings)),
        ("chromium", check_chromium),
        ("xvfb", check_xvfb),
        ("x11vnc", check_x11vnc),
        ("coturn", lambda: check_coturn(required=settings.run_coturn)),
        ("bubblewrap", check_bubblewrap),
        ("cgroups", check_cgroups),
        ("netns", check_network_namespaces),
        ("novnc", check_novnc),
        ("image", lambda: check_image(settings)),
    ]
    probes = [asyncio.to_thread(_guarded, name, check) for name, check in local]
    return list(await asyncio.gather(*probes, _guarded_database(settings)))


def failures(checks: list[Check]) -> list[Check]:
    """The checks that should make ``browservm doctor`` exit non-zero."""
    return [check for check in checks if check.required and not check.ok]


def _guarded(name: str, check: Callable[[], Check]) -> Check:
    try:
        return check()
    except Exception as exc:  # a doctor that crashes tells the operator nothing
        return Check(name, False, f"the check itself failed: {exc!r}", "report this as a browservm bug")


async def _guarded_database(settings: Settings) -> Check:
    try:
        return await check_database(settings)
    except Exception as exc:  # e.g. a URL SQLAlchemy cannot parse
        return Check("database", False, f"the check itself failed: {exc!r}", "check BROWSERVM_DATABASE_URL")


def _apt(package: str) -> str:
    return f"apt-get install -y --no-install-recommends {package}   (or run {_SETUP})"


def _probe(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=False)


def _first_line(output: str) -> str:
    lines = output.strip().splitlines()
    return lines[0].strip() if lines else ""


def _binary(name: str, candidates: list[str], package: str, version_args: list[str]) -> Check:
    for candidate in candidates:
        path = shutil.which(candidate)
        if path is None:
            continue
        result = _probe([path, *version_args])
        version = _first_line(result.stdout) or _first_line(result.stderr)
        return Check(name, True, f"{path}: {version}" if version else path)
    return Check(name, False, f"{' or '.join(candidates)} not found on PATH", _apt(package))


def check_chromium() -> Check:
    return _binary("chromium", ["chromium", "chromium-browser"], "chromium fonts-dejavu-core", ["--version"])


def check_xvfb() -> Check:
    # Xvfb has no --version; -help exits at once and proves the binary loads.
    found = shutil.which("Xvfb")
    if found is None:
        return Check("xvfb", False, "Xvfb not found on PATH", _apt("xvfb"))
    result = _probe([found, "-help"])
    if "-screen" not in result.stdout + result.stderr:
        return Check(
            "xvfb", False, f"{found} -help printed no usage (exit {result.returncode})", _apt("xvfb")
        )
    return Check("xvfb", True, found)


def check_x11vnc() -> Check:
    return _binary("x11vnc", ["x11vnc"], "x11vnc", ["-version"])


def check_coturn(*, required: bool) -> Check:
    check = _binary("coturn", ["turnserver"], "coturn", ["--version"])
    why = "" if required else " (needed only with BROWSERVM_RUN_COTURN=true or a local TURN server)"
    return Check(check.name, check.ok, check.detail + ("" if check.ok else why), check.fix, required)


def check_qemu(*, required: bool, settings: Settings | None = None) -> Check:
    """The binary, and what its VMs would run under (KVM or TCG, and why), with or without seccomp."""
    from browservm.sandbox.qemu import host

    binary = settings.qemu_bin if settings is not None else "qemu-system-x86_64"
    check = _binary("qemu", [binary], "qemu-system-x86", ["--version"])
    why = "" if required else " (needed only for BROWSERVM_BACKEND=qemu)"
    if not check.ok:
        return Check(check.name, False, check.detail + why, check.fix, required)
    found = host.inspect(binary, settings.qemu_accel if settings is not None else "auto")
    facts = f"{check.detail}; VMs under {found.why}; " + (
        "-sandbox on (seccomp)" if found.seccomp else "no -sandbox (QEMU built without seccomp)"
    )
    if found.problems:
        return Check(
            "qemu", False, facts + ": " + "; ".join(found.problems) + why, "see docs/qemu.md", required
        )
    return Check("qemu", True, facts)


def check_firecracker(settings: Settings) -> Check:
    """The binary and its version, the KVM it would run on, and /dev/vhost-vsock (reported, not needed)."""
    from browservm.sandbox.firecracker import host

    found = host.inspect(settings)
    required = settings.backend == "firecracker"
    kvm = found.kvm_module or "no KVM module"
    vhost = "/dev/vhost-vsock present" if found.vhost_vsock else "no /dev/vhost-vsock"
    binary = f"{found.binary}: Firecracker {found.version}" if found.binary and found.version else None
    facts = "; ".join(filter(None, [binary, f"KVM: {kvm}", vhost]))
    if found.ok:
        jailer = f"; jailer {found.jailer}" if found.jailer else "; unjailed"
        return Check("firecracker", True, facts + jailer)
    return Check(
        "firecracker",
        False,
        facts
        + ": "
        + "; ".join(found.problems)
        + ("" if required else " (needed only for BROWSERVM_BACKEND=firecracker)"),
        "on a KVM host (kvm_intel or kvm_amd), install the v1.16.1 release binaries and set "
        "BROWSERVM_FIRECRACKER_BIN; see docs/firecracker.md. Here: BROWSERVM_BACKEND=qemu or process",
        required,
    )


def check_kvm(dev: Path = Path("/dev/kvm"), modules: Path = Path("/sys/module")) -> Check:
    """Hardware KVM runs standard guest kernels; PVM (``kvm_pvm``) runs only PVM-built ones."""
    if not dev.exists():
        return Check(
            "kvm",
            False,
            f"{dev} does not exist: VMs run under QEMU's TCG emulation, many times slower",
            "use a host with hardware virtualization (VT-x/AMD-V, nested virtualization enabled for a VM)",
            required=False,
        )
    if not os.access(dev, os.R_OK | os.W_OK):
        return Check(
            "kvm", False, f"{dev} exists but this user cannot open it", "add the user to group kvm", False
        )
    if (modules / "kvm_intel").exists() or (modules / "kvm_amd").exists():
        vendor = "kvm_intel" if (modules / "kvm_intel").exists() else "kvm_amd"
        return Check("kvm", True, f"{dev} with {vendor}: hardware virtualization")
    if (modules / "kvm_pvm").exists():
        return Check(
            "kvm",
            False,
            f"{dev} is PVM only (kvm_pvm): standard guest kernels hang under -accel kvm, so QEMU runs them "
            "under TCG here and Firecracker cannot run (see docs/limits.md)",
            "for VM speed use a host whose KVM is kvm_intel or kvm_amd; the process backend is unaffected",
            required=False,
        )
    return Check("kvm", True, f"{dev} present (module not identified)")


def check_bubblewrap() -> Check:
    """Sandboxes run as an unprivileged user in a user namespace: build one the way the backend does."""
    from browservm.sandbox import bubblewrap
    from browservm.sandbox.process import UID_BASE

    found = shutil.which("bwrap")
    if found is None:
        return Check("bubblewrap", False, "bwrap not found on PATH", _apt("bubblewrap"))
    if shutil.which("setpriv") is None:
        return Check("bubblewrap", False, "setpriv not found on PATH", _apt("util-linux"))
    result = _probe(bubblewrap.probe_command(UID_BASE))
    if result.returncode != 0:
        return Check(
            "bubblewrap",
            False,
            f"{found} cannot build a sandbox as an unprivileged user: {_first_line(result.stderr)}",
            "run browservm as root and allow unprivileged user namespaces (sysctl user.max_user_namespaces"
            " > 0; Ubuntu: kernel.apparmor_restrict_unprivileged_userns=0)",
        )
    return Check("bubblewrap", True, f"{found}: unprivileged sandbox in a user namespace created and exited")


def check_cgroups() -> Check:
    """Per-sandbox limits need a writable cgroup hierarchy (v1 memory, pids and cpu, or v2)."""
    from browservm.sandbox.cgroups import Cgroups

    cgroups = Cgroups.detect("doctor")
    if cgroups is None:
        return Check(
            "cgroups",
            False,
            "no writable cgroup hierarchy with memory, pids and cpu: sandboxes would run without limits",
            "run browservm as root; under systemd set Delegate=yes (deploy/browservm.service does)",
            required=False,
        )
    detail = cgroups.describe()
    for base in cgroups.bases:
        with contextlib.suppress(OSError):
            base.rmdir()
    return Check("cgroups", True, detail)


def check_network_namespaces() -> Check:
    """The process backend puts every sandbox in its own network namespace: that needs CAP_SYS_ADMIN."""
    ip = shutil.which("ip")
    if ip is None:
        return Check("netns", False, "ip not found on PATH", _apt("iproute2"))
    unshare = shutil.which("unshare")
    if unshare is None:
        return Check("netns", False, "unshare not found on PATH", _apt("util-linux"))
    result = _probe([unshare, "--net", "true"])
    if result.returncode != 0:
        return Check(
            "netns",
            False,
            f"cannot create a network namespace: {_first_line(result.stderr)}",
            "run browservm as root (or with CAP_SYS_ADMIN and CAP_NET_ADMIN)",
        )
    if shutil.which("nft") is None:
        return Check(
            "netns", False, "nft not found on PATH: sandbox egress rules cannot be set", _apt("nftables")
        )
    return Check("netns", True, "network namespaces can be created; ip and nft present")


def check_novnc(directory: Path = NOVNC_DIR) -> Check:
    entry = directory / "core" / "rfb.js"
    if not entry.is_file():
        return Check(
            "novnc",
            False,
            f"{entry} missing: the VNC fallback viewer cannot load",
            f"run {_SETUP}: it installs @novnc/novnc from npm",
        )
    version_file = directory / ".version"
    version = version_file.read_text().strip() if version_file.is_file() else "unknown version"
    return Check("novnc", True, f"noVNC {version} in {directory}")


def check_image(settings: Settings, variant: Variant = "browser") -> Check:
    """The guest image sandboxes run: built or not, its key and age, and whether the recipe moved on."""
    from browservm.sandbox.image import Recipe, store_for

    store = store_for(settings)
    fix = f"browservm image build --variant {variant}   (scripts/run.sh does it; minutes the first time, see docs/image.md)"
    image = store.current(variant)
    if image is None:
        # Every process sandbox runs it as its root; the VM backends boot it.
        return Check("image", False, f"no {variant} guest image in {store.root}", fix)
    age_h = (datetime.now(UTC) - image.manifest.built_at).total_seconds() / 3600
    sizes = image.manifest.outputs
    detail = (
        f"{image.path} (key {image.key[:16]}, built {age_h:.1f} h ago, tree {sizes['tree'].bytes / 2**20:.0f} MiB, "
        f"ext4 {sizes['rootfs.ext4'].bytes / 2**20:.0f} MiB)"
    )
    if variant == "browser":
        # What the sign-ins need from it: Node and each provider's CLI, at the versions it holds.
        installed = {
            name: version
            for stage in image.manifest.stages.values()
            for kind, found in stage.packages.items()
            if kind in ("node", "npm")
            for name, version in found.items()
        }
        tools = {
            "node": "Node.js",
            "@anthropic-ai/claude-code": "Claude Code",
            "@openai/codex": "Codex",
            "@google/gemini-cli": "Gemini CLI",
        }
        missing = [label for name, label in tools.items() if name not in installed]
        if missing:
            return Check("image", False, f"{detail} lacks {', '.join(missing)}", fix)
        detail += "; " + ", ".join(f"{label} {installed[name]}" for name, label in tools.items())
    try:
        wanted = Recipe(variant).image_key()
    except (OSError, ValueError) as exc:  # no checkout (no requirements.lock): the image is what it is
        return Check("image", True, f"{detail}; recipe not checked: {exc}")
    if wanted != image.key:
        return Check(
            "image",
            False,
            f"{detail} is out of date: the agent's code or a pin changed since",
            fix,
            required=False,
        )
    return Check("image", True, detail)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_state_dir(state_dir: Path) -> Check:
    fix = f"create it writable by this user (mkdir -p {state_dir}) or set BROWSERVM_STATE_DIR"
    if state_dir.exists() and not state_dir.is_dir():
        return Check("state_dir", False, f"{state_dir} exists but is not a directory", fix)
    target = state_dir if state_dir.exists() else _nearest_existing(state_dir)
    if not target.is_dir():
        return Check("state_dir", False, f"{target}, on the way to {state_dir}, is not a directory", fix)
    # Write a file for real: os.access says yes to root on read-only or virtual file systems.
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".browservm-doctor-"):
            pass
    except OSError as exc:
        return Check("state_dir", False, f"cannot write in {target}: {exc.strerror}", fix)
    if target != state_dir:
        return Check(
            "state_dir", True, f"{state_dir} does not exist yet; {target} is writable, serve creates it"
        )
    return Check("state_dir", True, f"{state_dir} is writable")


def check_disk_space(state_dir: Path, min_free_bytes: int = MIN_FREE_BYTES) -> Check:
    where = _nearest_existing(state_dir)
    free = shutil.disk_usage(where).free
    detail = f"{free / 1024**3:.1f} GiB free at {where}"
    if free < min_free_bytes:
        return Check(
            "disk",
            False,
            f"{detail}; browservm needs at least {min_free_bytes / 1024**3:.1f} GiB",
            "free space there or set BROWSERVM_STATE_DIR to a larger file system",
        )
    return Check("disk", True, detail)


async def check_database(settings: Settings, timeout_s: float = _PROBE_TIMEOUT_S) -> Check:
    url = make_url(settings.effective_database_url)
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite":
        # Opening a missing file would create it empty; serve creates and migrates it instead.
        not_created = await asyncio.to_thread(_sqlite_not_created, Path(url.database or ""))
        if not_created is not None:
            return not_created
    engine = create_async_engine(url, pool_pre_ping=False)
    try:
        async with asyncio.timeout(timeout_s), engine.connect() as connection:
            version = (await connection.execute(text(_version_query(url.get_backend_name())))).scalar_one()
    except TimeoutError:
        return Check("database", False, f"{shown}: no answer within {timeout_s:.0f} s", _database_fix(url))
    except Exception as exc:  # every driver raises its own types; the message is what the operator needs
        reason = _first_line(str(getattr(exc, "orig", None) or exc)) or type(exc).__name__
        return Check("database", False, f"{shown}: {reason}", _database_fix(url))
    finally:
        await engine.dispose()
    return Check("database", True, f"{shown}: {_first_line(str(version))}")


def _sqlite_not_created(path: Path) -> Check | None:
    if path.exists():
        return None
    if path.parent.exists() and not path.parent.is_dir():
        return Check("database", False, f"{path.parent} is not a directory", "set BROWSERVM_STATE_DIR")
    return Check("database", True, f"SQLite {path} not created yet; serve creates it")


def _version_query(backend: str) -> str:
    # Reading sqlite_master makes SQLite open the file for real; sqlite_version() alone never touches it.
    if backend == "sqlite":
        return "SELECT 'SQLite ' || sqlite_version() FROM (SELECT count(*) FROM sqlite_master)"
    return "SELECT version()"


def _database_fix(url: URL) -> str:
    if url.get_backend_name() == "sqlite":
        return "check that the SQLite file is readable and not corrupt, or move it aside"
    return (
        "start PostgreSQL (pg_ctlcluster 15 main start, or systemctl start postgresql) and check "
        "BROWSERVM_DATABASE_URL (postgresql+asyncpg://user:password@host:5432/database)"
    )
