"""The minimal image's VM outputs boot under QEMU (microvm, TCG) and their init starts the agent.

A check of the image, not of a backend: QEMU is started by hand with the image's kernel, initramfs and
read-only ext4, and the serial console is read until the agent says it listens.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import time

import pytest

from browservm.sandbox.image import BuildResult

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

BOOT_TIMEOUT_S = 240.0
"""Software emulation on a shared 2-core machine: ~20 s when quiet, several times that under load."""
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def tsc_khz() -> int:
    """The host's TSC rate: under TCG the guest's TSC runs at it, and the kernel's own calibration against
    the emulated PIT fails when the host is busy (it then hangs), so it is told instead."""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    raise AssertionError("no 'cpu MHz' in /proc/cpuinfo")


@pytest.mark.parametrize(
    ("kernel", "extra_args"),
    [("vmlinuz", ""), ("vmlinux", "pci=off")],  # vmlinux with the Firecracker backend's pci=off
    ids=["vmlinuz", "vmlinux"],
)
async def test_the_vm_outputs_boot_and_the_init_starts_the_agent(
    minimal_build: BuildResult, kernel: str, extra_args: str
) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    image = minimal_build.image
    extra_env = base64.urlsafe_b64encode(
        json.dumps({"HTTPS_PROXY": "http://proxy.invalid:3128", "TZ": "UTC"}).encode()
    )
    cmdline = (
        f"{image.manifest.kernel_cmdline} {extra_args} tsc_early_khz={tsc_khz()} "
        # The firecracker backend's ip= (the kernel's format); the NIC below leads nowhere.
        "ip=10.9.0.2::10.9.0.1:255.255.255.0::eth0:off:10.9.0.1 "
        f"browservm.sandbox_id=vm-test browservm.role=cli browservm.env={extra_env.decode().rstrip('=')}"
    )
    argv = [
        qemu, "-M", "microvm,isa-serial=on,rtc=on", "-accel", "tcg", "-m", "512", "-smp", "1",
        "-nographic", "-no-reboot",
        "-kernel", str(image.path / kernel), "-initrd", str(image.initramfs), "-append", cmdline,
        "-drive", f"id=root,file={image.rootfs},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-rng-device",
        # A NIC on a hub with no other port: the guest's network exists and reaches nothing.
        "-netdev", "hubport,id=net0,hubid=0", "-device", "virtio-net-device,netdev=net0",
        # The QEMU backend's channel: a named virtio-serial port (here connected to nothing).
        "-device", "virtio-serial-device", "-chardev", "null,id=channel",
        "-device", "virtserialport,chardev=channel,name=org.browservm.agent",
    ]  # fmt: skip
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    console: list[str] = []
    assert process.stdout is not None
    try:
        async with asyncio.timeout(BOOT_TIMEOUT_S):
            while True:
                line = await process.stdout.readline()
                if not line:
                    pytest.fail("QEMU exited before the agent listened:\n" + "".join(console[-40:]))
                console.append(ANSI.sub("", line.decode(errors="replace")))
                if "agent.listening" in console[-1]:
                    break
    except TimeoutError:
        pytest.fail(f"no agent.listening within {BOOT_TIMEOUT_S:.0f} s; console:\n" + "".join(console[-40:]))
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
    seconds = time.monotonic() - started
    text = "".join(console)
    assert "browservm-initramfs: eth0: 10.9.0.2/24, default via 10.9.0.1, resolvers 10.9.0.1" in text
    assert "browservm-initramfs: root /dev/vda read-only, writes to tmpfs" in text
    # Names only: values of the extra environment may be credentials.
    assert "browservm-agent: environment from the kernel command line: HTTPS_PROXY, TZ" in text
    assert "proxy.invalid" not in text
    assert "browservm-init: virtio-serial port /dev/virtio-ports/org.browservm.agent -> /dev/vport" in text
    assert "browservm-init: starting the agent: sandbox vm-test, role cli" in text
    assert "sandbox_id=vm-test" in console[-1]
    print(f"\n{kernel}: agent listening {seconds:.1f} s after QEMU started")
