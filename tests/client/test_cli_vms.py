"""A user's CLI VM and credentials through the client: real sandboxes, real commands."""

from __future__ import annotations

import pytest

from browservm_client import AsyncClient, Conflict, ExecOutput, NotFound
from tests.controller.conftest import Controller

USER = "ops+alice@example.com"  # '+', '@' and '.' travel quoted in the path


async def test_exec_streams_output_then_returns_the_exit_code(
    api: AsyncClient, controller: Controller
) -> None:
    vm = await api.cli_vms.create(USER)
    assert vm.user_id == USER and vm.state == "running"
    assert (await api.cli_vms.get(USER)).sandbox_id == vm.sandbox_id
    with pytest.raises(Conflict) as twice:
        await api.cli_vms.create(USER)
    assert twice.value.code == "cli_vm_exists"

    # The command waits for a file the test writes only once the first line has arrived: it can finish
    # only if its output is streamed to us while it runs.
    home = controller.settings.state_dir / "sandboxes" / vm.sandbox_id / "home"
    chunks: list[ExecOutput] = []

    def arrived(chunk: ExecOutput) -> None:
        chunks.append(chunk)
        if "waiting" in chunk.data:
            (home / "go").touch()

    result = await api.cli_vms.exec(
        USER,
        [
            "sh",
            "-c",
            'echo waiting; while [ ! -e "$HOME/go" ]; do sleep 0.05; done; echo done; echo oops >&2; exit 3',
        ],
        timeout_s=30,
        on_output=arrived,
    )
    assert result.exit_code == 3 and not result.timed_out
    assert result.stdout == "waiting\ndone\n" and result.stderr == "oops\n"
    assert chunks == result.output

    killed = await api.cli_vms.exec(USER, ["sleep", "30"], timeout_s=0.5)
    assert killed.timed_out and killed.exit_code == -9

    # What the dashboard shows: the tenant's CLI VMs, and the last commands' output, newest first.
    assert [(v.user_id, v.state) for v in await api.cli_vms.list()] == [(USER, "running")]
    runs = (await api.cli_vms.output(USER)).runs
    assert [run.argv[0] for run in runs] == ["sleep", "sh"]
    assert runs[1].exit_code == 3 and "waiting\ndone\n" in runs[1].output


async def test_hibernate_resume_delete(api: AsyncClient) -> None:
    await api.cli_vms.create(USER)
    assert (await api.cli_vms.hibernate(USER)).state == "hibernated"
    with pytest.raises(Conflict) as asleep:
        await api.cli_vms.exec(USER, ["true"])
    assert asleep.value.code == "hibernated"
    assert (await api.cli_vms.resume(USER)).state == "running"
    assert (await api.cli_vms.exec(USER, ["true"])).exit_code == 0
    await api.cli_vms.delete(USER)
    with pytest.raises(NotFound) as gone:
        await api.cli_vms.get(USER)
    assert gone.value.code == "cli_vm_not_found"


async def test_credentials_of_a_user_without_any(api: AsyncClient) -> None:
    assert await api.credentials.list(USER) == []
    with pytest.raises(NotFound) as missing:
        await api.credentials.delete(USER, "cred_nope")
    assert missing.value.code == "credential_not_found"
