"""Runtime records stored by an earlier controller still load as each backend's model."""

from __future__ import annotations

from pathlib import Path

import pytest

from browservm.sandbox.base import Resources, SandboxError, SandboxHandle
from browservm.sandbox.firecracker.runtime import AGENT_VSOCK_PORT, FirecrackerRuntime
from browservm.sandbox.process import ProcessRuntime
from browservm.sandbox.qemu.runtime import QemuRuntime
from browservm.sandbox.vm_network import VmNetwork

NETWORK = {
    "netns": "bvm-abc-x",
    "address": "10.88.0.7",
    "gateway": "10.88.0.1",
    "prefix_len": 32,
    "mac": "02:00:0a:58:00:07",
    "dns": ["10.88.0.1"],
    "tap": "tap0",
}


def test_a_process_record_from_before_uids_and_cgroups_loads() -> None:
    old = {
        "pid": 41,
        "pgid": 41,
        "start_time": 1700000000.25,
        "dir": "/var/lib/browservm/sandboxes/s1",
        "socket": "/var/lib/browservm/sandboxes/s1/run/agent.sock",
        "bwrap": True,
        "netns": None,
    }
    runtime = SandboxHandle("s1", "process", "cli", old).runtime_as(ProcessRuntime)
    assert runtime.dir == Path(old["dir"]) and runtime.pid == 41 and runtime.start_time == 1700000000.25
    assert (runtime.uid, runtime.cgroup, runtime.resources) == (None, False, Resources())


def test_a_process_record_survives_the_store() -> None:
    runtime = ProcessRuntime(
        dir=Path("/d"), socket=Path("/d/run/agent.sock"), pid=7, start_time=1.5, uid=2_000_000_001,
        resources=Resources(vcpus=2, memory_mib=512), cgroup=True, netns="bvm-n", image=Path("/img"),
    )  # fmt: skip
    handle = SandboxHandle.of("s2", "process", "cli", runtime)
    assert handle.runtime["resources"]["memory_mib"] == 512 and handle.runtime["dir"] == "/d"
    assert handle.runtime_as(ProcessRuntime) == runtime


def test_a_qemu_record_from_before_the_host_port_loads_as_the_machine_it_was() -> None:
    old = {
        "dir": "/var/lib/browservm/qemu/vm1",
        "pid": None,
        "start_time": None,
        "channel": "/var/lib/browservm/qemu/vm1/channel.sock",
        "network": NETWORK,
        "config": {
            "kernel": "/images/vmlinuz",
            "rootfs": "/images/rootfs.ext4",
            "initrd": None,
            "cmdline": "console=ttyS0",
            "vcpus": 1,
            "memory_mib": 1024,
            "accel": "tcg",
            "uid": 2_000_000_002,
        },
        "hibernated": True,
    }
    runtime = SandboxHandle("vm1", "qemu", "cli", old).runtime_as(QemuRuntime)
    machine = runtime.machine("vm1")
    assert runtime.hibernated and machine.image.initrd is None and machine.accel == "tcg"
    assert (machine.groups, machine.seccomp, machine.host_port, machine.nic_mac) == ((), True, False, None)
    assert machine.network == VmNetwork(**{**NETWORK, "dns": ("10.88.0.1",)})
    assert runtime.record()["network"] == NETWORK, "the network is stored as it was"


def test_a_firecracker_record_without_its_vsock_port_loads() -> None:
    old = {
        "dir": "/var/lib/browservm/firecracker/fc1",
        "root": "/var/lib/browservm/firecracker/fc1/vm",
        "jail_dir": None,
        "pid": 99,
        "start_time": 3.0,
        "network": NETWORK,
        "hibernated": False,
    }
    runtime = SandboxHandle("fc1", "firecracker", "cli", old).runtime_as(FirecrackerRuntime)
    assert runtime.vsock_port == AGENT_VSOCK_PORT and runtime.network.tap == "tap0"
    assert runtime.layout.root == Path(old["root"]) and runtime.layout.jail_dir is None


def test_no_record_or_a_broken_one_is_a_sandbox_error() -> None:
    assert not SandboxHandle("s3", "process", "cli", {}).recorded
    with pytest.raises(SandboxError, match="recorded nothing"):
        SandboxHandle("s3", "process", "cli", {}).runtime_as(ProcessRuntime)
    with pytest.raises(SandboxError, match="not a QemuRuntime"):
        SandboxHandle("s3", "qemu", "cli", {"dir": "/x"}).runtime_as(QemuRuntime)
