"""The checked-in JSON Schema keeps the channel contract honest across guest image versions: the code must
match the file of its protocol version, and a change within a version may only add."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from browservm import protocol
from browservm.protocol import schema


def test_the_code_speaks_no_incompatible_change_to_its_protocol_version() -> None:
    recorded = schema.recorded()
    assert recorded is not None, (
        f"no {schema.schema_path().name}: run python -m browservm.protocol.schema --write"
    )
    problems = schema.incompatibilities(recorded, schema.current())
    assert problems == [], (
        "an agent or controller of protocol "
        f"{protocol.PROTOCOL_VERSION} built before this change could not speak to one built after it; "
        "raise PROTOCOL_VERSION (and write the new schema), or make the change additive:\n  "
        + "\n  ".join(problems)
    )


def test_the_checked_in_schema_is_the_codes() -> None:
    assert schema.current() == schema.recorded(), (
        "the messages changed: record a compatible change with python -m browservm.protocol.schema "
        "--write (it refuses an incompatible one)"
    )
    assert schema.main([]) == 0


def test_every_message_and_every_reply_is_recorded() -> None:
    document = schema.current()
    assert set(document["messages"]) == protocol.KNOWN_TYPES
    assert set(document["replies"]) == protocol.REQUEST_TYPES
    assert document["replies"]["status"]["properties"]["services"]["additionalProperties"][
        "properties"
    ].keys() >= {
        "state",
        "pid",
    }, "a reply's nested models are written out, not referenced"


def _changed(edit: Any) -> list[str]:
    old = schema.current()
    new = copy.deepcopy(old)
    edit(new)
    return schema.incompatibilities(old, new)


def _drop(document: dict[str, Any], section: str, kind: str, field: str) -> None:
    del document[section][kind]["properties"][field]


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda d: _drop(d, "messages", "exec", "timeout_s"), "field 'timeout_s' was removed"),
        (lambda d: _drop(d, "replies", "exec", "exec_id"), "field 'exec_id' was removed"),
        (lambda d: d["messages"].pop("close_stream"), "message 'close_stream' was removed"),
        (
            lambda d: d["messages"]["configure"]["required"].append("provider"),
            "a field 'provider' is required",
        ),
        (
            lambda d: (
                d["messages"]["status"]["properties"].update(verbose={"type": "boolean"}),
                d["messages"]["status"].setdefault("required", []).append("verbose"),
            ),
            "a new field 'verbose' is required",
        ),
        (
            lambda d: d["messages"]["exec_exit"]["properties"]["exit_code"].update(type="string"),
            "exit_code.type changed",
        ),
        (
            lambda d: d["messages"]["service_state"]["properties"]["service"]["enum"].append("pulseaudio"),
            "service.enum changed",
        ),
        (
            lambda d: d["replies"]["status"]["properties"]["login"]["anyOf"][0]["properties"].pop("url"),
            "field 'url' was removed",
        ),
    ],
)
def test_what_breaks_an_older_peer_is_incompatible(edit: Any, says: str) -> None:
    problems = _changed(edit)
    assert any(says in problem for problem in problems), problems


def test_adding_a_message_or_an_optional_field_is_compatible() -> None:
    def grow(document: dict[str, Any]) -> None:
        document["messages"]["teleport"] = {"type": "object", "properties": {"type": {"const": "teleport"}}}
        document["messages"]["exec"]["properties"]["nice"] = {"type": "integer", "default": 0}
        document["replies"]["status"]["properties"]["uptime_s"] = {"type": "number"}

    assert _changed(grow) == []


def test_the_file_is_plain_json_of_one_version() -> None:
    text = schema.schema_path().read_text()
    assert json.loads(text)["protocol_version"] == protocol.PROTOCOL_VERSION
