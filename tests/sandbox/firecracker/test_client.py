"""The API client and the VM lifecycle against the stand-in, which checks every request against
Firecracker v1.16.1's published API document and answers with Firecracker's status codes and words."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest

from browservm.sandbox.firecracker import definitions
from browservm.sandbox.firecracker.client import (
    FirecrackerApiError,
    FirecrackerClient,
    FirecrackerUnreachable,
)
from browservm.sandbox.firecracker.definitions import (
    BootSource,
    Drive,
    MachineConfiguration,
    MemoryBackend,
    NetworkInterface,
    SerialDevice,
    SnapshotCreateParams,
    SnapshotLoadParams,
    Vsock,
)
from browservm.sandbox.firecracker.microvm import (
    API_SOCKET,
    SNAPSHOT_MEMORY,
    SNAPSHOT_STATE,
    VSOCK_SOCKET,
    MicroVM,
    VmError,
    VmLayout,
)
from browservm.sandbox.firecracker.network import VmNetwork, attach_tap, detach_tap
from tests.sandbox.firecracker.conftest import ImageFiles, Standin, links_in
from tests.sandbox.firecracker.contract import Contract

POST_BOOT = "The requested operation is not supported after starting the microVM."


@pytest.fixture
async def vm(standin: Standin, short_dir: Path, netns: str) -> AsyncIterator[MicroVM]:
    """A launched stand-in VMM in its own network namespace, not configured yet."""
    vm = MicroVM(
        "sbx_client", VmLayout.unjailed(short_dir / "sbx"), firecracker=str(standin.binary), netns=netns
    )
    vm.layout.root.mkdir(parents=True)
    await vm.launch(timeout_s=15)
    yield vm
    await vm.kill()


@pytest.fixture
async def client(vm: MicroVM) -> AsyncIterator[FirecrackerClient]:
    async with vm.client() as client:
        yield client


@pytest.fixture
async def tap(netns: str) -> AsyncIterator[VmNetwork]:
    network = VmNetwork(
        netns=netns, address="10.231.0.2", gateway="10.231.0.1", prefix_len=32, mac="02:fc:00:00:00:01"
    )
    await attach_tap("sbx_client", network)
    yield network
    await detach_tap("sbx_client", netns, network.tap)


def test_the_models_are_the_documents_definitions(contract: Contract) -> None:
    """Each request model is a definition of v1.16.1's document, field for field, with its required set."""
    documented = contract.document["definitions"]
    models = [
        obj
        for obj in vars(definitions).values()
        if isinstance(obj, type)
        and issubclass(obj, definitions.Definition)
        and obj is not definitions.Definition
    ]
    assert len(models) >= 13
    for model in models:
        assert model.__name__ in documented, f"{model.__name__} is not a definition of Firecracker's API"
        properties = documented[model.__name__]["properties"]
        assert set(model.model_fields) <= set(properties), model.__name__
        required = {name for name, field in model.model_fields.items() if field.is_required()}
        assert set(documented[model.__name__].get("required", [])) <= required, model.__name__
    assert contract.version == "1.16.1"


async def test_a_vm_is_configured_started_paused_snapshotted_and_resumed(
    vm: MicroVM, client: FirecrackerClient, standin: Standin, image: ImageFiles, tap: VmNetwork
) -> None:
    root = vm.layout.root
    overlay = root / "overlay.ext4"
    overlay.write_bytes(b"\0" * 4096)
    assert (await client.describe_instance()).state == "Not started"
    assert await client.version() == "1.16.1"
    await client.put_machine_config(MachineConfiguration(vcpu_count=2, mem_size_mib=256))
    await client.put_boot_source(
        BootSource(
            kernel_image_path=str(image.kernel), initrd_path=str(image.initrd), boot_args="console=ttyS0"
        )
    )
    await client.put_drive(
        Drive(drive_id="rootfs", is_root_device=True, is_read_only=True, path_on_host=str(image.rootfs))
    )
    await client.put_drive(
        Drive(drive_id="overlay", is_root_device=False, is_read_only=False, path_on_host=str(overlay))
    )
    await client.put_network_interface(
        NetworkInterface(iface_id="eth0", host_dev_name=tap.tap, guest_mac=tap.mac)
    )
    await client.put_vsock(Vsock(guest_cid=3, uds_path=str(root / VSOCK_SOCKET)))
    assert (root / VSOCK_SOCKET).exists(), "Firecracker binds the vsock socket when the device is configured"
    await client.put_serial(SerialDevice(serial_out_path=str(root / "console.log")))
    await client.start()
    assert (await client.describe_instance()).state == "Running"
    assert "booting" in (root / "console.log").read_text()

    await client.pause()
    assert (await client.describe_instance()).state == "Paused"
    (root / "snapshot").mkdir()
    await client.create_snapshot(
        SnapshotCreateParams(
            snapshot_path=str(root / SNAPSHOT_STATE),
            mem_file_path=str(root / SNAPSHOT_MEMORY),
            snapshot_type="Full",
        )
    )
    assert (root / SNAPSHOT_MEMORY).stat().st_size == 256 * 1024 * 1024, "memory is written at its full size"
    await client.resume()
    assert (await client.describe_instance()).state == "Running"

    requests = standin.assert_all_valid()
    assert [r["status"] for r in requests if r["method"] != "GET"] == [204] * 11
    assert "putGuestNetworkInterfaceByID" in standin.operations()


async def test_configuring_a_started_vm_is_refused_with_firecrackers_words(
    client: FirecrackerClient, image: ImageFiles, standin: Standin
) -> None:
    await client.put_boot_source(BootSource(kernel_image_path=str(image.kernel)))
    await client.start()
    with pytest.raises(FirecrackerApiError) as refused:
        await client.put_machine_config(MachineConfiguration(vcpu_count=1, mem_size_mib=512))
    assert refused.value.status == 400
    assert refused.value.fault_message == POST_BOOT
    assert "before InstanceStart" in str(refused.value), "the error says what to do"
    with pytest.raises(FirecrackerApiError, match="after starting"):
        await client.start()
    standin.assert_all_valid()


async def test_snapshots_need_a_paused_vm_and_load_needs_a_fresh_process(
    client: FirecrackerClient, vm: MicroVM, image: ImageFiles, standin: Standin
) -> None:
    root = vm.layout.root
    with pytest.raises(FirecrackerApiError, match="before starting the microVM"):
        await client.pause()
    await client.put_boot_source(BootSource(kernel_image_path=str(image.kernel)))
    with pytest.raises(FirecrackerApiError) as not_fresh:
        await client.load_snapshot(
            SnapshotLoadParams(
                snapshot_path=str(root / "state"),
                mem_backend=MemoryBackend(backend_type="File", backend_path="/m"),
            )
        )
    assert "not allowed after configuring boot-specific resources" in not_fresh.value.fault_message
    assert "fresh Firecracker process" in not_fresh.value.hint
    await client.start()
    with pytest.raises(FirecrackerApiError) as running:
        await client.create_snapshot(
            SnapshotCreateParams(snapshot_path=str(root / "s"), mem_file_path=str(root / "m"))
        )
    assert "save/restore unavailable while running" in running.value.fault_message
    assert "pause the VM" in running.value.hint
    assert not (root / "s").exists()
    standin.assert_all_valid()


async def test_missing_files_are_refused_when_configured(
    client: FirecrackerClient, short_dir: Path, standin: Standin
) -> None:
    with pytest.raises(FirecrackerApiError) as kernel:
        await client.put_boot_source(BootSource(kernel_image_path=str(short_dir / "no-vmlinux")))
    assert kernel.value.fault_message.startswith(
        "Boot source error: The kernel file cannot be opened: No such file"
    )
    assert "BROWSERVM_VM_KERNEL" in kernel.value.hint
    with pytest.raises(FirecrackerApiError, match="Drive config error") as drive:
        await client.put_drive(
            Drive(
                drive_id="rootfs",
                is_root_device=True,
                is_read_only=True,
                path_on_host=str(short_dir / "none.ext4"),
            )
        )
    assert "BROWSERVM_VM_ROOTFS" in drive.value.hint
    with pytest.raises(FirecrackerApiError, match="Start microvm error: Cannot start microvm without kernel"):
        await client.start()
    standin.assert_all_valid()


async def test_a_failed_restore_answers_then_the_process_exits(
    client: FirecrackerClient, vm: MicroVM, standin: Standin
) -> None:
    root = vm.layout.root
    with pytest.raises(FirecrackerApiError) as failed:
        await client.load_snapshot(
            SnapshotLoadParams(
                snapshot_path=str(root / "missing.state"),
                mem_backend=MemoryBackend(backend_type="File", backend_path=str(root / "missing.mem")),
                resume_vm=True,
            )
        )
    assert (
        "Failed to get snapshot state from file: Failed to open snapshot file: No such file"
        in failed.value.fault_message
    )
    assert "start a new one" in failed.value.hint
    assert vm.pid is not None
    await asyncio.to_thread(psutil.Process(vm.pid).wait, 10)
    assert not vm.alive()
    with pytest.raises(FirecrackerUnreachable):
        await client.describe_instance()
    standin.assert_all_valid()


async def test_a_request_outside_the_document_is_refused_like_firecrackers_serde(
    client: FirecrackerClient, vm: MicroVM, standin: Standin
) -> None:
    """The stand-in really checks: a body the document does not allow gets Firecracker's 400."""
    transport = httpx.AsyncHTTPTransport(uds=str(vm.layout.host(API_SOCKET)))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as raw:
        unknown_field = await raw.put(
            "/machine-config", json={"vcpu_count": 1, "mem_size_mib": 128, "memory": 1}
        )
        wrong_type = await raw.put("/vsock", json={"guest_cid": "three", "uds_path": "/v.sock"})
        no_such_path = await raw.put("/vms/1", json={})
    assert unknown_field.status_code == 400
    assert "deserializing the json body" in unknown_field.json()["fault_message"]
    assert "'memory' was unexpected" in unknown_field.json()["fault_message"]
    assert wrong_type.status_code == 400
    assert no_such_path.json() == {"fault_message": "Invalid request method and/or path: PUT /vms/1."}
    logged = standin.requests()
    assert [bool(r["errors"]) for r in logged] == [False, True, True, True], (
        "GET / from launch, then three bad ones"
    )


async def test_the_api_socket_that_never_answers_is_unreachable(short_dir: Path) -> None:
    async with FirecrackerClient(short_dir / "nothing.socket") as client:
        with pytest.raises(FirecrackerUnreachable, match="does not answer"):
            await client.wait_ready(0.2)


async def test_a_binary_that_exits_at_once_is_reported_with_its_log(short_dir: Path, netns: str) -> None:
    broken = short_dir / "firecracker"
    broken.write_text("#!/bin/sh\necho 'Error: Invalid instance ID' >&2\nexit 1\n")
    broken.chmod(0o755)
    vm = MicroVM("sbx_broken", VmLayout.unjailed(short_dir / "sbx"), firecracker=str(broken), netns=netns)
    with pytest.raises(VmError, match=r"firecracker did not come up: .*exited") as failed:
        await vm.launch(timeout_s=15)
    assert "Invalid instance ID" in failed.value.detail
    assert not vm.alive()


def test_firecrackers_instance_ids_take_no_underscore() -> None:
    from browservm.sandbox.firecracker.microvm import instance_id

    assert instance_id("sbx_AbC9") == "sbx-AbC9"
    with pytest.raises(ValueError, match="cannot be a Firecracker id"):
        instance_id("sbx/../x")


async def test_network_interface_needs_a_tap_it_can_attach(
    client: FirecrackerClient, tap: VmNetwork, netns: str
) -> None:
    assert tap.tap in links_in(netns)
    await client.put_network_interface(
        NetworkInterface(iface_id="eth0", host_dev_name=tap.tap, guest_mac=tap.mac)
    )
    with pytest.raises(FirecrackerApiError, match="MAC address is already in use"):
        await client.put_network_interface(
            NetworkInterface(iface_id="eth1", host_dev_name=tap.tap, guest_mac=tap.mac)
        )
