"""Per-user egress end to end: real tinyproxies on the sandbox network's gateway, each leaving from an
address of its own, in front of the demo OAuth server; a warm sandbox signs a user in through that
user's proxy, and nothing of it leaves any other way."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from browservm.settings import Settings
from tests.controller.conftest import Controller, controller_settings, remove_everything, run_controller
from tests.controller.demo_login import run_in_cli_vm, sign_in
from tests.support.netns import sandbox_netns
from tests.support.tinyproxy import Tinyproxy

pytestmark = pytest.mark.timeout(240)

EXITS = ("127.0.0.2", "127.0.0.3")
"""Where each test proxy's connections leave from: what the demo server sees of a user."""


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports on the loopback."""
    while True:
        first = 20000 + secrets.randbelow(30000)
        try:
            for port in range(first, first + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first


async def reach(netns: str, address: str, port: int) -> bool:
    """Whether a TCP connection from inside ``netns`` (a sandbox's network) to address:port is answered."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(1.5)\n"
        f"sys.exit(0 if s.connect_ex(({address!r},{port}))==0 else 1)\n"
    )
    process = await asyncio.create_subprocess_exec("ip", "netns", "exec", netns, "python3", "-c", code)
    return await process.wait() == 0


@dataclass
class Bed:
    controller: Controller
    gateway: str
    first_port: int
    proxies: list[Tinyproxy]
    password: str

    async def demo_clients(self) -> list[dict[str, str]]:
        return await demo_clients(self.controller)


async def demo_clients(controller: Controller) -> list[dict[str, str]]:
    """Who the demo server saw: address, method, path, user agent of each request."""
    async with httpx.AsyncClient() as client:
        answer = await client.get(
            f"http://127.0.0.1:{controller.settings.demo_oauth_port}/demo/oauth/clients"
        )
    rows: list[dict[str, str]] = answer.json()
    return rows


def egress_settings(
    tmp_path: Path, database_url: str, first: int, secret: Path, policy: dict[str, str]
) -> Settings:
    """A controller whose one pool has three ports from ``first`` on the gateway (proxy A, proxy B and
    a port where no proxy runs), checked against the demo server's ``/ip``."""
    settings = controller_settings(tmp_path, database_url, warm_pool_size=1, max_sandboxes=3)
    gateway = str(settings.sandbox_subnet.network_address + 1)
    return controller_settings(
        tmp_path,
        database_url,
        warm_pool_size=1,
        max_sandboxes=3,
        sandbox_subnet=str(settings.sandbox_subnet),
        egress_pools=[
            {
                "name": "test",
                "host": gateway,
                "ports": f"{first}-{first + 2}",
                "username": "u-{user}",
                "password_file": str(secret),
            }
        ],
        egress_policy=policy,
        egress_check_url=f"http://{gateway}:{settings.demo_oauth_port}/demo/oauth/ip",
        demo_oauth_port=settings.demo_oauth_port,
        egress_check_timeout_s=3,
    )


def proxy_secret(tmp_path: Path) -> tuple[str, Path]:
    password = secrets.token_urlsafe(12)
    secret = tmp_path / "proxy-password"
    secret.write_text(password + "\n")
    os.chmod(secret, 0o600)
    return password, secret


def make_proxies(tmp_path: Path, gateway: str, first: int, password: str) -> list[Tinyproxy]:
    users = {f"u-{name}": password for name in ("alice", "bob", "carol")}
    return [
        Tinyproxy(tmp_path, listen=gateway, port=first + i, exit_address=EXITS[i], users=users)
        for i in range(2)
    ]


@pytest.fixture
async def bed(request: pytest.FixtureRequest, tmp_path: Path, database_url: str) -> AsyncIterator[Bed]:
    """The test bed; ``indirect`` parametrization gives the providers' egress policy."""
    first = free_ports(3)  # proxy A, proxy B, and a port where no proxy runs (a dead exit)
    password, secret = proxy_secret(tmp_path)
    settings = egress_settings(tmp_path, database_url, first, secret, getattr(request, "param", {}))
    gateway = str(settings.sandbox_subnet.network_address + 1)
    async with run_controller(settings) as controller:
        # The gateway exists once the controller runs; the proxies listen there, as an operator's would.
        proxies = make_proxies(tmp_path, gateway, first, password)
        for proxy in proxies:
            await proxy.__aenter__()
        try:
            yield Bed(controller, gateway, first, proxies, password)
        finally:
            for proxy in proxies:
                await proxy.stop()


async def wait_warm(controller: Controller) -> None:
    deadline = time.monotonic() + 90
    while (await controller.api.capacity()).warm_idle < 1:
        assert time.monotonic() < deadline, "the warm pool never filled"
        await asyncio.sleep(0.5)


async def test_a_warm_sign_in_goes_only_through_the_users_proxy(bed: Bed) -> None:
    controller = bed.controller
    api = controller.api
    proxy_a, proxy_b = bed.proxies

    alice, bob = await api.egress.get("alice"), await api.egress.get("bob")
    assert (alice.port, bob.port) == (bed.first_port, bed.first_port + 1), "two users, two exits"
    assert alice.username == "u-alice" and bed.password not in alice.model_dump_json()
    assert (await api.egress.get("alice")).port == alice.port, "sticky"
    checked = await api.egress.check("alice")
    assert (checked.status, checked.exit_address) == ("ok", EXITS[0])

    await wait_warm(controller)
    created = time.monotonic()
    session = await api.sessions.create(user_id="alice", provider="demo")
    waiting = await controller.wait_status(session.id, "awaiting_user", "failed")
    print(f"egress: warm session to awaiting_user through the proxy in {time.monotonic() - created:.2f}s")
    assert waiting["status"] == "awaiting_user", waiting["reason"]
    netns = sandbox_netns(controller.settings.state_dir, waiting["sandbox_id"])

    # What the guest itself can reach: its proxy, and not the sign-in server or bob's proxy directly.
    port = controller.settings.demo_oauth_port
    assert await reach(netns, bed.gateway, bed.first_port)
    assert not await reach(netns, bed.gateway, port), "a direct connection to the sign-in server passed"
    assert not await reach(netns, bed.gateway, bed.first_port + 1), "alice's guest reached bob's proxy"
    # The password is on no command line of the host (the sandbox's processes among them).
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert bed.password.encode() not in cmdline, f"the proxy password is in pid {pid}'s arguments"

    done = await sign_in(controller, session.id, "alice@example.com")
    assert done["status"] == "completed"

    seen_a = proxy_a.seen()
    guest = {s.client for s in seen_a if "/demo/oauth/" in s.url and not s.url.endswith("/ip")}
    assert guest and all(c.startswith(bed.gateway.rsplit(".", 1)[0]) for c in guest), seen_a
    paths = [s.url for s in seen_a if s.client in guest]
    assert any("/authorize?" in url for url in paths), "the browser's page did not come through the proxy"
    assert any(s.method == "POST" and s.url.endswith("/token") for s in seen_a), (
        "the CLI's token request did not"
    )
    assert not [s for s in proxy_b.seen() if s.client in guest], "alice's traffic went through bob's proxy"

    flow = [c for c in await bed.demo_clients() if c["path"].endswith(("/authorize", "/token"))]
    assert flow, "the demo server saw no sign-in"
    assert {c["address"] for c in flow} == {EXITS[0]}, f"the sign-in server saw other clients: {flow}"
    assert any(c["user_agent"].startswith("Python-urllib") for c in flow), "no CLI request came through"

    # Nothing of the password in the events, the database or anything else of the state directory.
    events = [json.dumps({"kind": e.kind, **e.data}) async for e in api.sessions.events(session.id)]
    assert any('"session.egress"' in e and f":{bed.first_port}" in e for e in events), events
    assert not any(bed.password in e for e in events)
    for path in controller.settings.state_dir.rglob("*"):
        if path.is_file():
            assert bed.password.encode() not in path.read_bytes(), f"the proxy password is in {path}"

    await api.egress.get("carol")  # the dead exit has a user too: rotation takes the lower of equals
    rotated = await api.egress.rotate("alice")
    assert rotated.port != alice.port and rotated.generation == 1
    after = await api.egress.check("alice")
    assert after.exit_address == EXITS[1], "rotation did not change the exit"
    metrics = await api.metrics()
    assert 'browservm_egress_checks_total{pool="test",result="ok"}' in metrics
    assert 'browservm_egress_sessions_total{outcome="proxy",pool="test"}' in metrics


async def test_a_dead_proxy_fails_the_session_fast_with_its_reason(bed: Bed) -> None:
    api = bed.controller.api
    for user in ("alice", "bob"):
        await api.egress.get(user)
    carol = await api.egress.get("carol")
    assert carol.port == bed.first_port + 2  # where no proxy runs
    started = time.monotonic()
    session = await api.sessions.create(user_id="carol", provider="demo")
    ended = await bed.controller.wait_status(session.id, "failed", "awaiting_user", timeout_s=20)
    elapsed = time.monotonic() - started
    print(f"egress: a dead proxy failed the session in {elapsed:.2f}s")
    assert ended["status"] == "failed"
    assert "egress proxy is down" in ended["reason"] and f"port {carol.port}" in ended["reason"], ended[
        "reason"
    ]
    assert "egress/rotate" in ended["reason"]
    assert elapsed < 5, f"took {elapsed:.1f}s to fail"
    assert ended["sandbox_id"] is None, "a sandbox was taken for a session that could not leave"
    bad = await api.egress.get("carol")
    assert bad.status == "bad" and "connect" in bad.detail.lower(), bad.detail


def fetch_code(url: str, agent: str) -> str:
    """A command for the CLI VM: GET ``url`` as any program would (urllib reads HTTP_PROXY), print it."""
    return (
        "import urllib.request\n"
        f"request = urllib.request.Request({url!r}, headers={{'User-Agent': {agent!r}}})\n"
        "print(urllib.request.urlopen(request, timeout=10).read().decode())\n"
    )


def tunnel_code(host: str, port: int, path: str, agent: str) -> str:
    """A command for the CLI VM: GET ``path`` through a CONNECT tunnel to host:port via HTTPS_PROXY (how
    the CLIs reach their HTTPS APIs), print the body."""
    return (
        "import http.client, os, urllib.parse\n"
        "proxy = urllib.parse.urlsplit(os.environ['HTTPS_PROXY'])\n"
        "conn = http.client.HTTPConnection(proxy.hostname, proxy.port, timeout=10)\n"
        f"conn.set_tunnel({host!r}, {port})\n"
        f"conn.request('GET', {path!r}, headers={{'User-Agent': {agent!r}}})\n"
        "print(conn.getresponse().read().decode())\n"
    )


def connect_code(address: str, port: int) -> str:
    """A command for the CLI VM: exit 0 if a TCP connection to address:port is answered."""
    return (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(2)\n"
        f"sys.exit(0 if s.connect_ex(({address!r},{port}))==0 else 1)\n"
    )


async def test_a_cli_vm_leaves_only_through_its_users_proxy(bed: Bed) -> None:
    controller, api = bed.controller, bed.controller.api
    proxy_a, proxy_b = bed.proxies
    port = controller.settings.demo_oauth_port
    alice = await api.egress.get("alice")
    assert alice.port == bed.first_port
    await api.cli_vms.create("alice")

    ip_url = f"http://{bed.gateway}:{port}/demo/oauth/ip?from=cli-vm"
    started = time.monotonic()
    output, code = await run_in_cli_vm(controller, "alice", ["python3", "-c", fetch_code(ip_url, "cli-vm-a")])
    print(
        f"egress: a CLI VM's exec fetched through its forwarder and proxy in {time.monotonic() - started:.2f}s"
    )
    assert code == 0, output
    assert output.strip() == EXITS[0], f"the CLI VM's request did not leave through alice's exit: {output}"
    assert any("from=cli-vm" in s.url for s in proxy_a.seen()), "not in proxy A's log"
    assert not any("from=cli-vm" in s.url for s in proxy_b.seen())
    tunnel = tunnel_code(bed.gateway, port, "/demo/oauth/ip", "cli-vm-tunnel")
    output, code = await run_in_cli_vm(controller, "alice", ["python3", "-c", tunnel])
    assert (code, output.strip()) == (0, EXITS[0]), output
    assert any(s.method == "CONNECT" for s in proxy_a.seen()), proxy_a.seen()
    flow = [c for c in await bed.demo_clients() if c["user_agent"].startswith("cli-vm-")]
    assert {c["user_agent"] for c in flow} == {"cli-vm-a", "cli-vm-tunnel"}, flow
    assert {c["address"] for c in flow} == {EXITS[0]}, flow

    # Direct, the sign-in server and the upstream proxy itself are out of the VM's reach.
    for address, target in (
        (bed.gateway, port),
        (bed.gateway, bed.first_port),
        (bed.gateway, bed.first_port + 1),
    ):
        output, code = await run_in_cli_vm(
            controller, "alice", ["python3", "-c", connect_code(address, target)]
        )
        assert code == 1, f"the CLI VM reached {address}:{target} directly"

    # The VM's commands are told a proxy without credentials; the password is in no process's arguments.
    output, code = await run_in_cli_vm(controller, "alice", ["env"])
    assert "HTTPS_PROXY=http://" in output and "NODE_USE_ENV_PROXY=1" in output, output
    assert bed.password not in output and "@" not in output.split("HTTPS_PROXY=", 1)[1].split()[0]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert bed.password.encode() not in cmdline, f"the proxy password is in pid {pid}'s arguments"

    # Rotation moves the running VM to the new exit at its next connection.
    rotated = await api.egress.rotate("alice")
    assert rotated.port == bed.first_port + 1
    output, code = await run_in_cli_vm(controller, "alice", ["python3", "-c", fetch_code(ip_url, "cli-vm-b")])
    assert code == 0, output
    assert output.strip() == EXITS[1], f"after rotation the CLI VM left through {output}"
    assert any("from=cli-vm" in s.url for s in proxy_b.seen()), "not in proxy B's log after rotation"
    for path in controller.settings.state_dir.rglob("*"):
        if path.is_file():
            assert bed.password.encode() not in path.read_bytes(), f"the proxy password is in {path}"
    await api.cli_vms.delete("alice")


@pytest.mark.parametrize("bed", [{"demo": "proxy-then-direct"}], indirect=True)
async def test_proxy_then_direct_signs_in_direct_when_the_proxy_is_dead(bed: Bed) -> None:
    controller, api = bed.controller, bed.controller.api
    for user in ("alice", "bob"):
        await api.egress.get(user)
    carol = await api.egress.get("carol")
    assert carol.port == bed.first_port + 2  # where no proxy runs
    await wait_warm(controller)
    session = await api.sessions.create(user_id="carol", provider="demo")
    done = await sign_in(controller, session.id, "carol@example.com")
    assert done["status"] == "completed"

    events = [e async for e in api.sessions.events(session.id)]
    (egress,) = [e.data for e in events if e.kind == "session.egress"]
    assert egress["mode"] == "direct", egress
    note = str(egress["note"])
    assert "egress proxy is down" in note and f"port {carol.port}" in note, note
    assert "proxy-then-direct" in note, note
    # It went direct: the sign-in server saw the guest's own address, no proxy carried any of it.
    flow = [c for c in await bed.demo_clients() if c["path"].endswith(("/authorize", "/token"))]
    assert flow and not {c["address"] for c in flow} & set(EXITS), flow
    prefix = bed.gateway.rsplit(".", 1)[0]
    assert all(c["address"].startswith(prefix) for c in flow), flow
    for proxy in bed.proxies:
        assert not [s for s in proxy.seen() if "/authorize" in s.url or s.url.endswith("/token")]
    metrics = await api.metrics()
    assert 'browservm_egress_sessions_total{outcome="fallback_direct",pool="test"}' in metrics


async def test_a_restarted_controller_keeps_a_running_sessions_exit(
    tmp_path: Path, database_url: str
) -> None:
    """The user is rotated while their session runs, then the controller restarts: the adopted session
    is granted the exit its browser was configured with, not the user's new one, and signs in; the user's
    CLI VM leaves through the new one."""
    first = free_ports(3)
    password, secret = proxy_secret(tmp_path)
    settings = egress_settings(tmp_path, database_url, first, secret, {})
    gateway = str(settings.sandbox_subnet.network_address + 1)
    proxies = make_proxies(tmp_path, gateway, first, password)
    first_life = run_controller(settings, clean_up=False)
    try:
        controller = await first_life.__aenter__()
        for proxy in proxies:
            await proxy.__aenter__()
        api = controller.api
        assert (await api.egress.get("alice")).port == first
        session = await api.sessions.create(user_id="alice", provider="demo")
        waiting = await controller.wait_status(session.id, "awaiting_user", "failed")
        assert waiting["status"] == "awaiting_user", waiting["reason"]
        netns = sandbox_netns(settings.state_dir, waiting["sandbox_id"])
        await api.cli_vms.create("alice")
        assert (await api.egress.rotate("alice")).port == first + 1
        await first_life.__aexit__(
            None, None, None
        )  # stopped: the session's sandbox runs on for the next controller

        async with run_controller(settings) as controller:
            deadline = time.monotonic() + 20
            while not await reach(netns, gateway, first):
                assert time.monotonic() < deadline, "the adopted session lost its proxy"
            assert not await reach(netns, gateway, first + 1), "adopted with the user's new exit"
            assert (await controller.api.sessions.get(session.id)).sandbox_id == waiting["sandbox_id"]
            done = await sign_in(controller, session.id, "alice@example.com")
            assert done["status"] == "completed"
            flow = [c for c in await demo_clients(controller) if c["path"].endswith(("/authorize", "/token"))]
            assert flow and {c["address"] for c in flow} == {EXITS[0]}, flow
            # The CLI VM follows its user: the new exit, through a forwarder this controller started.
            url = f"http://{gateway}:{settings.demo_oauth_port}/demo/oauth/ip"
            output, code = await run_in_cli_vm(controller, "alice", ["python3", "-c", fetch_code(url, "cli")])
            assert (code, output.strip()) == (0, EXITS[1]), output
    finally:
        await first_life.__aexit__(None, None, None)
        for proxy in proxies:
            await proxy.stop()
        await remove_everything(settings)
