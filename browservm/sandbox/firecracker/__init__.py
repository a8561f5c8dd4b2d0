"""The Firecracker backend, written to Firecracker v1.16.1's published API (see docs/firecracker.md).

Its parts, each a module named after what it holds: :mod:`.definitions` (the API's request and answer
bodies), :mod:`.client` (the API client over the unix socket), :mod:`.vsock` (the host end of vsock),
:mod:`.network` (the TAP and the guest's addressing), :mod:`.disk` (the writable overlay),
:mod:`.jailer` (the optional jail), :mod:`.microvm` (one VM's lifecycle), :mod:`.host` (what a host
needs) and :mod:`.backend` (the :class:`~browservm.sandbox.base.SandboxBackend` glue).
"""

from browservm.sandbox.firecracker.backend import FirecrackerBackend

__all__ = ["FirecrackerBackend"]
