"""Files the controller writes into a CLI sandbox user's home (delivered credentials, settings).

Every path that arrives over the channel is relative to the home directory and must stay inside it:
absolute paths, ``..`` and symlinks that lead out are refused (:class:`BadPath`, code ``bad_path``).
Files are written atomically (a temp file beside the target, fsync, rename, fsync of the directory), so
a CLI never reads half a credential file, even if the guest loses power mid-write.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from browservm import protocol


class FileRequestError(protocol.RequestError):
    """A write the agent refuses (or a path of another request); :attr:`kind` is the Reply's error code."""

    kind = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(self.kind, message)


class BadPath(FileRequestError):
    kind = "bad_path"


def path_in_home(home: Path, relative: str) -> Path:
    """The absolute path of ``relative`` under ``home``, or :class:`BadPath` if it would leave it."""
    pure = PurePosixPath(relative)
    if not relative or "\0" in relative:
        raise BadPath(f"path {relative!r} is empty or contains NUL")
    if pure.is_absolute():
        raise BadPath(f"path {relative!r} is absolute; give it relative to the home directory")
    if ".." in pure.parts:
        raise BadPath(f"path {relative!r} climbs out with '..'")
    root = home.resolve()
    target = root.joinpath(*pure.parts)
    # Symlinks already in the home could point anywhere: the directory the file lands in must resolve
    # inside the home. The file itself may be a symlink: rename replaces the link, not what it points to.
    if not target.parent.resolve().is_relative_to(root):
        raise BadPath(f"path {relative!r} leads out of the home directory through a symlink")
    return target


def read_files(home: Path, paths: Sequence[str]) -> list[protocol.FileBlob]:
    """The files at ``paths`` (relative to the home, checked as for writing) that exist, with their mode."""
    found = []
    for relative in paths:
        target = path_in_home(home, relative)
        try:
            content = target.read_bytes()
            mode = target.stat().st_mode & 0o7777
        except (FileNotFoundError, IsADirectoryError):
            continue
        found.append(
            protocol.FileBlob(path=relative, content_b64=base64.b64encode(content).decode(), mode=mode)
        )
    return found


def write_files(home: Path, files: Sequence[protocol.FileBlob]) -> list[str]:
    """Write every file atomically with its mode; all paths are checked before any file is written."""
    planned: list[tuple[Path, bytes, int]] = []
    for blob in files:
        target = path_in_home(home, blob.path)
        try:
            content = base64.b64decode(blob.content_b64, validate=True)
        except binascii.Error as exc:
            raise FileRequestError(f"content of {blob.path!r} is not valid base64: {exc}") from exc
        if not 0 <= blob.mode <= 0o7777:
            raise FileRequestError(f"mode {blob.mode:o} of {blob.path!r} is not a file mode")
        if blob.merge == "json":
            try:
                update = json.loads(content)
            except ValueError as exc:
                raise FileRequestError(
                    f"content of {blob.path!r} is not JSON, so it cannot merge: {exc}"
                ) from exc
            if not isinstance(update, dict):
                raise FileRequestError(f"content of {blob.path!r} must be a JSON object to merge")
            content = _merged(target, update)
        planned.append((target, content, blob.mode))
    for target, content, mode in planned:
        _write_atomically(target, content, mode)
    return [str(target.relative_to(home.resolve())) for target, _, _ in planned]


def merge_json(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` laid over ``base``: objects merge key by key, any other value replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge_json(merged[key], value)
        else:
            merged[key] = value
    return merged


def _merged(target: Path, update: dict[str, Any]) -> bytes:
    """The merged content for ``target``. A file there that is not a JSON object is kept aside as
    ``<name>.unreadable`` rather than lost."""
    try:
        current = json.loads(target.read_bytes())
    except FileNotFoundError:
        current = {}
    except (OSError, ValueError):
        current = None
    if not isinstance(current, dict):
        os.replace(target, target.with_name(target.name + ".unreadable"))
        current = {}
    return json.dumps(merge_json(current, update), indent=2).encode()


def _write_atomically(target: Path, content: bytes, mode: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)
    os.replace(temp, target)
    directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
