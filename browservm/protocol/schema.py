"""The messages as JSON Schema, checked in per protocol version, and what may change within a version.

Guest images and controllers are built at different times; one of protocol version N must understand
any other of version N. ``v{N}.schema.json`` beside this module records version N: every message by its
``type``, and the reply model of every request. Within a version a change may only *add*: a new message
type, or a field that is optional. Removing a message or field, making a field required or changing what
a field holds (its type, its allowed values, its bounds) is incompatible, and needs
:data:`~browservm.protocol.messages.PROTOCOL_VERSION` raised (older files stay as the record).

``python -m browservm.protocol.schema`` says whether the code matches the file of its version;
``--write`` records a compatible change (and refuses an incompatible one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel

from browservm.protocol.messages import PROTOCOL_VERSION, AnyRequest, Message, Request

HERE = Path(__file__).resolve().parent
_WORDS = frozenset({"title", "description"})
"""Prose about a message, left to :mod:`browservm.protocol.messages`: the file holds the contract only."""
_IGNORED = _WORDS | {"default"}
"""Not part of what a reader accepts: a sender always sends every field, so a default is a courtesy."""


def schema_path(version: int = PROTOCOL_VERSION) -> Path:
    return HERE / f"v{version}.schema.json"


def _members(union: object) -> list[type[BaseModel]]:
    (members, *_meta) = get_args(union)
    return list(get_args(members))


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """``node`` with every ``$ref`` to ``#/$defs/X`` replaced by X itself (the messages are not recursive),
    and without prose."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {
            key: _inline(value, defs)
            for key, value in node.items()
            # A field may be named "title": only the prose (a string) goes.
            if key != "$defs" and not (key in _WORDS and isinstance(value, str))
        }
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    return node


def _schema_of(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    inlined: dict[str, Any] = _inline(schema, schema.get("$defs", {}))
    return inlined


def current() -> dict[str, Any]:
    """The schema document of the code as it is."""
    messages = {member.model_fields["type"].default: _schema_of(member) for member in _members(Message)}
    replies = {
        member.model_fields["type"].default: _schema_of(member.reply_model)
        for member in _members(AnyRequest)
        if issubclass(member, Request)
    }
    return {
        "protocol_version": PROTOCOL_VERSION,
        "messages": dict(sorted(messages.items())),
        "replies": dict(sorted(replies.items())),
    }


def recorded(version: int = PROTOCOL_VERSION) -> dict[str, Any] | None:
    path = schema_path(version)
    if not path.exists():
        return None
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def incompatibilities(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What in ``new`` breaks a peer built to ``old`` (both schema documents); empty when compatible."""
    problems: list[str] = []
    for section in ("messages", "replies"):
        for kind, schema in old[section].items():
            where = f"{section[:-1]} {kind!r}"
            if kind not in new[section]:
                problems.append(f"{where} was removed")
            else:
                _compare(schema, new[section][kind], where, problems)
    return problems


def _compare(old: Any, new: Any, where: str, problems: list[str]) -> None:
    if not (isinstance(old, dict) and isinstance(new, dict)):
        if old != new:
            problems.append(f"{where} changed from {json.dumps(old)} to {json.dumps(new)}")
        return
    old_properties, new_properties = old.get("properties", {}), new.get("properties", {})
    for name, schema in old_properties.items():
        if name not in new_properties:
            problems.append(f"{where}: field {name!r} was removed")
        else:
            _compare(schema, new_properties[name], f"{where}.{name}", problems)
    old_required, new_required = set(old.get("required", [])), set(new.get("required", []))
    for name in sorted(new_required - old_required):
        added = "a new field" if name not in old_properties else "a field"
        problems.append(f"{where}: {added} {name!r} is required (an older sender does not send it)")
    for key in sorted((old.keys() | new.keys()) - _IGNORED - {"properties", "required"}):
        if key not in old or key not in new:
            problems.append(f"{where}: {key!r} was {'added' if key in new else 'removed'}")
        elif isinstance(old[key], list) and isinstance(new[key], list) and key in ("anyOf", "oneOf", "allOf"):
            if len(old[key]) != len(new[key]):
                problems.append(f"{where}: the alternatives of {key!r} changed")
            for index, (before, after) in enumerate(zip(old[key], new[key], strict=False)):
                _compare(before, after, f"{where}[{index}]", problems)
        else:
            _compare(old[key], new[key], f"{where}.{key}", problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m browservm.protocol.schema", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--write", action="store_true", help="record a compatible change in the schema file")
    args = parser.parse_args(argv)
    document, path = current(), schema_path()
    before = recorded()
    problems = incompatibilities(before, document) if before is not None else []
    if problems:
        print(f"incompatible with {path.name}; raise PROTOCOL_VERSION instead:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    if document == before:
        print(f"{path.name} matches the code")
        return 0
    if not args.write:
        state = "is missing" if before is None else "is behind the code (a compatible change)"
        print(f"{path.name} {state}: run python -m browservm.protocol.schema --write", file=sys.stderr)
        return 1
    path.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
