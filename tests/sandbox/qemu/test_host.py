"""Which accelerator QEMU's VMs get: KVM only with hardware virtualization, TCG otherwise or when told."""

from __future__ import annotations

from pathlib import Path

import pytest

from browservm.guest.listener import listener_for
from browservm.guest.serial import SerialListener
from browservm.sandbox.qemu import host
from browservm.sandbox.vm_network import VmNetwork


def _host(tmp_path: Path, module: str | None, *, kvm: bool = True) -> tuple[Path, Path]:
    modules = tmp_path / "module"
    modules.mkdir()
    if module:
        (modules / module).mkdir()
    dev = tmp_path / "kvm"
    if kvm:
        dev.touch()
    return dev, modules


@pytest.mark.parametrize(
    ("module", "kvm", "setting", "wanted", "says"),
    [
        ("kvm_intel", True, "auto", "kvm", "kvm_intel"),
        ("kvm_amd", True, "auto", "kvm", "kvm_amd"),
        ("kvm_pvm", True, "auto", "tcg", "PVM"),
        (None, True, "auto", "tcg", "neither kvm_intel nor kvm_amd"),
        (None, False, "auto", "tcg", "does not exist"),
        ("kvm_intel", True, "tcg", "tcg", "BROWSERVM_QEMU_ACCEL=tcg"),
        ("kvm_pvm", True, "kvm", "kvm", "BROWSERVM_QEMU_ACCEL=kvm"),
    ],
)
def test_the_accelerator_follows_the_host_unless_told(
    tmp_path: Path, module: str | None, kvm: bool, setting: str, wanted: str, says: str
) -> None:
    dev, modules = _host(tmp_path, module, kvm=kvm)
    accel, why = host.choose_accel(setting, kvm=dev, modules=modules)  # type: ignore[arg-type]
    assert accel == wanted
    assert says in why


def test_this_host_says_why() -> None:
    found = host.inspect("qemu-system-x86_64", "auto")
    assert found.why.startswith(("KVM", "TCG"))


def test_the_agent_listens_on_the_port_the_kernel_command_line_names() -> None:
    listener = listener_for("serial:/dev/virtio-ports/org.browservm.agent")
    assert isinstance(listener, SerialListener)
    assert listener.path == Path("/dev/virtio-ports/org.browservm.agent")
    with pytest.raises(SystemExit, match="serial:/dev/virtio-ports/NAME"):
        listener_for("serial:relative")


def test_the_guest_is_told_its_address_in_the_kernels_format() -> None:
    network = VmNetwork("ns", "10.88.0.7", "10.88.0.1", 32, "02:42:0a:58:00:07", ("9.9.9.9",))
    assert network.kernel_ip_arg() == "ip=10.88.0.7::10.88.0.1:255.255.255.255::eth0:off:9.9.9.9"
    # A bridge port with the guest's own MAC would take the guest's frames for itself.
    assert network.uplink_mac != network.mac and network.uplink_mac.endswith(network.mac[2:])
