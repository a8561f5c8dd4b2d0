"""Firecracker's published API document, as a validator of requests and answers (bravado-core).

The document (``shared/firecracker/firecracker-v1.16.1.yaml``, Swagger 2.0) is read where the project's
``shared/`` sits beside the checkout. Two faithful adjustments before bravado-core reads it:

- every object definition without ``additionalProperties`` gets ``false``: Firecracker's config structs
  are ``#[serde(deny_unknown_fields)]``, so an unknown field is a 400 there, and must be one here;
- every operation gets a tag: bravado-core groups operations by tag or first path segment, and ``/``
  has none. Tags change nothing that is validated.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DOCUMENT_NAME = "firecracker-v1.16.1.yaml"
_CHECKOUT = Path(__file__).resolve().parents[3]


def document_path() -> Path | None:
    """``$BROWSERVM_FIRECRACKER_API_DOC``, else ``shared/firecracker/`` beside the checkout (or its parent,
    for a worktree under ``wt/``)."""
    if explicit := os.environ.get("BROWSERVM_FIRECRACKER_API_DOC"):
        return Path(explicit) if Path(explicit).is_file() else None
    for base in (_CHECKOUT.parent, _CHECKOUT.parent.parent):
        candidate = base / "shared" / "firecracker" / DOCUMENT_NAME
        if candidate.is_file():
            return candidate
    return None


def load_document(path: Path) -> dict[str, Any]:
    # A JSON round trip turns YAML's integer response codes (200:) into the strings Swagger requires.
    document: dict[str, Any] = json.loads(json.dumps(yaml.safe_load(path.read_text())))
    for definition in document["definitions"].values():
        if definition.get("type") == "object" and "additionalProperties" not in definition:
            definition["additionalProperties"] = False
    for operations in document["paths"].values():
        for operation in operations.values():
            operation.setdefault("tags", ["firecracker"])
    return document


@dataclass(frozen=True)
class Checked:
    operation: str | None
    """The document's operationId, ``None`` when no operation has that method and path."""
    errors: list[str]
    body: Any = None


class Contract:
    def __init__(self, path: Path) -> None:
        from bravado_core.spec import Spec  # 1-2 s of imports: only where a contract is checked

        self.path = path
        self.document = load_document(path)
        self.version = self.document["info"]["version"]
        self.spec = Spec.from_dict(
            self.document,
            config={
                "use_models": False,
                "validate_requests": True,
                "validate_responses": True,
                "validate_swagger_spec": True,
            },
        )
        self._routes: list[tuple[str, re.Pattern[str], Any]] = []
        for resource in self.spec.resources.values():
            for operation in resource.operations.values():
                pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", operation.path_name)
                self._routes.append((operation.http_method.upper(), re.compile(f"{pattern}$"), operation))

    def operation(self, method: str, path: str) -> tuple[Any, dict[str, str]] | None:
        for route_method, pattern, operation in self._routes:
            if route_method == method and (match := pattern.match(path)):
                return operation, match.groupdict()
        return None

    def check_request(self, method: str, path: str, body: Any) -> Checked:
        from bravado_core.request import IncomingRequest, unmarshal_request

        found = self.operation(method, path)
        if found is None:
            return Checked(None, [f"{method} {path} is not an operation of Firecracker {self.version}"])
        operation, path_params = found

        class Request(IncomingRequest):  # type: ignore[misc]
            def __init__(self) -> None:
                self.path = path_params
                self.query: dict[str, str] = {}
                self.headers: dict[str, str] = {}
                self.form: dict[str, str] = {}
                self.files: dict[str, Any] = {}

            def json(self) -> Any:
                return body

        try:
            unmarshal_request(Request(), operation)
        except Exception as exc:  # jsonschema's ValidationError or bravado's mapping errors
            return Checked(operation.operation_id, [getattr(exc, "message", None) or str(exc)], body)
        return Checked(operation.operation_id, [], body)

    def check_response(self, method: str, path: str, status: int, body: Any) -> list[str]:
        from bravado_core.response import OutgoingResponse, get_response_spec, validate_response

        found = self.operation(method, path)
        if found is None:
            return []  # an unknown path's 400 has no operation to check against
        operation, _ = found
        text = "" if body is None else json.dumps(body)

        class Response(OutgoingResponse):  # type: ignore[misc]
            content_type = "application/json"
            headers: dict[str, str] = {}
            raw_bytes = text.encode()

            def __init__(self) -> None:
                self.text = text

            def json(self, **_: Any) -> Any:
                return body

        try:
            validate_response(get_response_spec(status, operation), operation, Response())
        except Exception as exc:
            return [f"answer {status} to {method} {path}: {getattr(exc, 'message', None) or exc}"]
        return []
