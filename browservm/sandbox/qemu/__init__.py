"""The QEMU backend: ``qemu-system-x86_64 -M microvm``, the VMM that really runs here (see docs/qemu.md).

Its parts, each a module named after what it holds: :mod:`.host` (the binary, KVM or TCG), :mod:`.launcher`
(root's last steps before QEMU runs as the sandbox's user), :mod:`.network` (the TAP on a bridge with the
sandbox's ``eth0``), :mod:`.qmp` (the machine protocol client), :mod:`.machine` (one VM's files, command
line and lifecycle) and :mod:`.backend` (the :class:`~browservm.sandbox.base.SandboxBackend` glue).
"""

from browservm.sandbox.qemu.backend import QemuBackend

__all__ = ["QemuBackend"]
