"""What a tenant gets from inside a process sandbox, tried the way an attacker would from their CLI VM:
privileges, mounts, the controller's files and other tenants', limits, and a double fault."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from browservm import protocol
from browservm.sandbox.base import Liveness, Resources, SandboxHandle, SandboxSpec
from browservm.sandbox.channel import Channel
from browservm.sandbox.process import MARKER_ENV, ProcessBackend
from tests.support.commands import shell
from tests.support.image import image_tree
from tests.support.network import BackendNetwork

BOOT_S = 20.0


async def cli_sandbox(
    backend: ProcessBackend, sandbox_id: str, **resources: int
) -> tuple[SandboxHandle, Channel]:
    spec = SandboxSpec(sandbox_id=sandbox_id, role="cli", resources=Resources(**resources))
    handle = await backend.create(spec)
    return handle, await backend.connect(handle, timeout_s=BOOT_S)


def host_processes(handle: SandboxHandle) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARKER_ENV) == handle.runtime["dir"]:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.fixture
async def hidden_state() -> AsyncIterator[tuple[ProcessBackend, Path, Path]]:
    """A backend whose state directory holds the controller's secrets, and a config file beside it."""
    # Not under /tmp, which every sandbox sees empty anyway: the state directory must be hidden itself.
    state_dir = Path(tempfile.mkdtemp(prefix="bvm-", dir="/var/tmp"))
    config = state_dir.with_name(state_dir.name + "-config.toml")
    config.write_text('turn_secret = "hunter2-hunter2"\n')
    config.chmod(0o644)  # readable by anyone on the host: only the sandbox's view hides it
    for name, content in {
        "vault.json": '{"keys": "the vault key"}',
        "browservm.db": "sealed credentials of every user",
        "controller.key": "signs every viewer token",
    }.items():
        (state_dir / name).write_text(content)
        (state_dir / name).chmod(0o644)
    state_dir.chmod(0o755)
    backend = ProcessBackend(state_dir, image_tree())
    try:
        yield backend, state_dir, config
    finally:
        for sandbox_id in await backend.list_orphans([]):
            await backend.destroy_orphan(sandbox_id)
        shutil.rmtree(state_dir, ignore_errors=True)
        config.unlink(missing_ok=True)


async def test_a_guest_has_no_privilege_and_its_own_unprivileged_host_user(backend: ProcessBackend) -> None:
    mine, channel = await cli_sandbox(backend, "priv1")
    theirs, other = await cli_sandbox(backend, "priv2")
    try:
        code, status = await shell(channel, "id; grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status")
        assert code == 0, status
        assert "uid=1000(user) gid=1000(user) groups=1000(user)" in status
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert f"{cap}:\t0000000000000000" in status, status
        assert "NoNewPrivs:\t1" in status
        assert "Seccomp:\t2" in status, "a seccomp filter is loaded"

        # Out here, the agent and all it starts run as that sandbox's own unprivileged uid (only
        # bubblewrap's outer monitor, which runs no guest code and waits, is root's).
        agent = next(p for p in host_processes(mine) if p.cmdline()[1:3] == ["-m", "browservm.guest.agent"])
        guest = [agent, *agent.children(recursive=True)]
        uid = mine.runtime["uid"]
        assert {p.uids().real for p in guest} == {uid} and uid >= 100_000
        assert theirs.runtime["uid"] != uid

        # Sniffing a shared loopback needs a raw socket (CAP_NET_RAW): refused.
        code, raw = await shell(
            channel, "python3 -c 'import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)'"
        )
        assert code != 0 and "PermissionError" in raw, raw
        # Another sandbox's processes are not even visible (a PID namespace each): just this one's.
        _code, seen = await shell(channel, "cat /proc/[0-9]*/comm")
        assert set(seen.split()) <= {"bwrap", "cat", "python3", "sh"}, seen
    finally:
        await channel.close()
        await other.close()
        await backend.destroy(mine)
        await backend.destroy(theirs)


async def test_a_guest_cannot_leave_or_change_its_mounts(backend: ProcessBackend, state_dir: Path) -> None:
    handle, channel = await cli_sandbox(backend, "mnt1")
    try:
        # The attack of the first slice: a new mount namespace, then unmount what hides the state dir.
        code, out = await shell(channel, f"unshare -m sh -c 'umount -l {state_dir}; ls {state_dir}'")
        assert code != 0 and "Operation not permitted" in out, out
        code, out = await shell(channel, "unshare -U -r true")
        assert code != 0, out
        for attempt in (
            f"umount -l {state_dir}",
            "umount -l /root",
            "mount -o remount,rw /",
            "mount -t tmpfs none /mnt",
            "mount --bind /home/user /usr",
        ):
            code, out = await shell(channel, attempt)
            assert code != 0, f"{attempt}: {out}"
        code, out = await shell(channel, "touch /usr/bin/planted /etc/planted /planted")
        assert code != 0 and out.count("Read-only file system") == 3, out
        code, out = await shell(channel, "touch /home/user/mine /tmp/mine && echo written")
        assert code == 0 and "written" in out, out
    finally:
        await channel.close()
        await backend.destroy(handle)


async def test_a_guest_reads_nothing_of_the_controller_or_of_other_tenants(
    hidden_state: tuple[ProcessBackend, Path, Path],
) -> None:
    backend, state_dir, config = hidden_state
    mine, channel = await cli_sandbox(backend, "mine")
    theirs, other = await cli_sandbox(backend, "theirs")
    try:
        blob = protocol.FileBlob(path=".claude/.credentials.json", content_b64="c2VjcmV0LXRva2Vu")
        await other.request(protocol.WriteFiles(files=[blob]))
        await channel.request(protocol.WriteFiles(files=[blob]))
        assert await shell(channel, "cat .claude/.credentials.json") == (0, "secret-token")
        sandboxes = state_dir / "sandboxes"
        # Its root is the guest image: nothing of the host's file system is there to read.
        _code, listing = await shell(channel, "ls -A /run /home")
        assert listing.split() == ["/home:", "user", "/run:", "browservm"], listing
        _code, release = await shell(channel, "cat /etc/os-release; ls /usr/share/doc | head -3")
        assert "bookworm" in release
        for path in (
            sandboxes / "theirs/home/.claude/.credentials.json",
            sandboxes / "theirs/run/agent.sock",
            state_dir / "vault.json",
            state_dir / "browservm.db",
            state_dir / "controller.key",
        ):
            code, read = await shell(channel, f"cat {path}")
            assert code != 0 and "No such file" in read, (path, read)
        code, read = await shell(channel, f"cat {config}")
        assert code != 0 and "hunter2" not in read, read
        # Nothing of the host's databases or agents either (their sockets live under /run).
        code, sockets = await shell(channel, "ls /run/postgresql /var/run/postgresql")
        assert code != 0, sockets
        assert (sandboxes / "theirs/home/.claude/.credentials.json").exists(), "still there for its owner"
    finally:
        await channel.close()
        await other.close()
        await backend.destroy(mine)
        await backend.destroy(theirs)


async def test_limits_stop_a_fork_bomb_a_memory_hog_and_a_tmpfs_filler(backend: ProcessBackend) -> None:
    handle, channel = await cli_sandbox(backend, "lim1", tasks=64, memory_mib=256, tmp_mib=32)
    try:
        fork_bomb = (
            "import os, time\n"
            "children = []\n"
            "try:\n"
            "    for _ in range(500):\n"
            "        pid = os.fork()\n"
            "        if pid == 0:\n"
            "            time.sleep(30)\n"
            "            os._exit(0)\n"
            "        children.append(pid)\n"
            "except OSError as exc:\n"
            '    print("refused after", len(children), exc.strerror)\n'
            "for pid in children:\n"
            "    os.kill(pid, 9)\n"
        )
        code, out = await shell(channel, f"python3 -c '{fork_bomb}'")
        assert "refused after" in out and "Resource temporarily unavailable" in out, out
        assert int(out.split()[2]) < 64, out

        code, out = await shell(
            channel, "python3 -c 'x = bytearray(512 * 1024 * 1024); print(\"allocated\")'"
        )
        assert "allocated" not in out and code != 0, out

        code, out = await shell(channel, "head -c 64M /dev/zero > /tmp/fill; df -m /tmp | tail -1")
        assert "No space left on device" in out, out
        assert out.split()[-5] == "32", out  # the tmpfs is 32 MiB, not half the host's memory
        assert await backend.probe(handle) is Liveness.ALIVE, "the agent outlived its hogs"
    finally:
        await channel.close()
        await backend.destroy(handle)


async def test_a_double_fault_leaves_nothing_behind(state_dir: Path) -> None:
    """Its bubblewrap monitor killed, then its controller: the next controller still finds and ends
    every process of the sandbox."""
    backend = ProcessBackend(state_dir, image_tree())
    handle, channel = await cli_sandbox(backend, "fault1")
    await shell(channel, "sleep 300 >/dev/null 2>&1 & echo started")
    await channel.close()
    assert len(host_processes(handle)) >= 4
    os.kill(handle.runtime["pid"], signal.SIGKILL)

    restarted = ProcessBackend(
        state_dir, image_tree()
    )  # the controller died too: nothing of the old instance is left
    adopted = SandboxHandle(handle.sandbox_id, "process", "cli", dict(handle.runtime))
    assert await restarted.probe(adopted) is Liveness.ALIVE, "its agent still runs"
    assert host_processes(adopted), "processes of the sandbox run on"
    await restarted.destroy(adopted)
    assert host_processes(adopted) == []
    assert not Path(handle.runtime["dir"]).exists()
    assert await restarted.list_orphans([]) == []


def _listen(host: str, port: int = 0) -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(8)
    server.settimeout(0.2)
    return server


CONNECT = (
    "python3 -c 'import socket, sys\n"
    "s = socket.socket(); s.settimeout(2)\n"
    "try:\n"
    '    s.connect((sys.argv[1], int(sys.argv[2]))); print("connected")\n'
    "except OSError as exc:\n"
    '    print("refused" if isinstance(exc, ConnectionRefusedError) else "unreachable", exc)\n'
    "' "
)


async def test_a_guest_reaches_only_what_its_network_allows(
    backend: ProcessBackend, network: BackendNetwork
) -> None:
    """A sandbox has a loopback of its own and one link to the host: the controller's port, a host
    loopback service and another tenant's OAuth callback are out of reach; the allowed service is not."""
    allowed = _listen(network.gateway, network.web_port)
    controller = _listen("127.0.0.1")  # the controller's API, on the host's loopback
    port = controller.getsockname()[1]
    on_gateway = _listen(network.gateway, port)  # the same port, on the address guests do reach
    mine = await backend.create(await network.spec("net1", "cli"))
    theirs = await backend.create(await network.spec("net2", "cli"))
    channel = await backend.connect(mine, timeout_s=BOOT_S)
    other = await backend.connect(theirs, timeout_s=BOOT_S)
    try:
        assert (await shell(channel, f"{CONNECT} {network.gateway} {network.web_port}"))[1].startswith(
            "connected"
        )
        out = (await shell(channel, f"{CONNECT} 127.0.0.1 {port}"))[1]
        assert out.startswith("refused"), f"the host's loopback must not be the guest's: {out}"
        out = (await shell(channel, f"{CONNECT} {network.gateway} {port}"))[1]
        assert out.startswith("unreachable"), f"only allowed host services answer: {out}"

        # The victim's CLI waits for its OAuth callback on its own loopback (Codex uses port 1455).
        await other.request(
            protocol.Exec(
                argv=[
                    "python3",
                    "-c",
                    "import socket, time; s = socket.create_server(('0.0.0.0', 1455)); time.sleep(60)",
                ],
                timeout_s=60,
            )
        )
        assert theirs.runtime["netns"] == network.netns("net2")
        victim = str(network.network.config.subnet.network_address + 3)  # net2's address, handed out second
        async with asyncio.timeout(10):  # the victim's callback answers on its own loopback first
            while not (await shell(other, f"{CONNECT} 127.0.0.1 1455"))[1].startswith("connected"):
                pass
        _code, mine_seen = await shell(channel, f"{CONNECT} {victim} 1455; {CONNECT} 127.0.0.1 1455")
        assert mine_seen.splitlines()[0].startswith("unreachable"), mine_seen
        assert mine_seen.splitlines()[1].startswith("refused"), mine_seen

        # Taking the controller's port while it is down: in its own namespace the guest may bind it,
        # and nothing of the host's changes.
        _code, bound = await shell(
            channel,
            f'python3 -c \'import socket; socket.create_server(("127.0.0.1", {port})); print("bound")\'',
        )
        assert "bound" in bound
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # still the host's own listener
        # And no raw socket to sniff with, on the sandbox's link or anywhere.
        _code, raw = await shell(
            channel, "python3 -c 'import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)'"
        )
        assert "PermissionError" in raw

        # IPv4 only, the policy's family: no IPv6 address inside, none on the host's end of the link
        # (a link-local one would be a way around the policy, and each new one tells every program on
        # the host watching its addresses that the network changed).
        _code, inet6 = await shell(channel, "cat /proc/net/if_inet6; echo end")
        assert inet6.strip() == "end", inet6
        host_end = subprocess.run(
            ["ip", "-6", "-o", "address", "show", "dev", network.network.interface_of("net1")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert host_end == "", host_end
    finally:
        await channel.close()
        await other.close()
        await backend.destroy(mine)
        await backend.destroy(theirs)
        for server in (allowed, controller, on_gateway):
            server.close()
