"""One error shape for the whole API: ``{"error": {"code": ..., "message": ...}}``.

Every failure a client can cause maps to a 4xx with a code a program can switch on and a message a
person can act on. Anything else is a bug: it is logged with its traceback and answered with a 500
that reveals nothing.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger(__name__)


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def not_found(kind: str, ident: str) -> ApiError:
    return ApiError(404, f"{kind}_not_found", f"no {kind} {ident!r} for this API key")


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        location = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "header")]
        where = ".".join(location) or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


COMMON = {
    "400": "Malformed request (e.g. invalid JSON, bad cursor)",
    "401": "Missing, invalid or expired credentials",
    "403": "Credentials valid but not for this resource",
    "404": "No such resource for these credentials",
    "409": "The resource is not in a state that allows this",
    "413": "Request body too large",
    "415": "Unsupported content type",
    "422": "A field is invalid; the message names it",
    "429": "Host at capacity, this API key over its request rate or its event streams; retry after the "
    "Retry-After delay",
}


def document(app: FastAPI) -> None:
    """Put the uniform error body in the OpenAPI document, for every status any route can answer with.

    FastAPI documents only 422 (with its own body shape, which this API does not use); clients and
    contract tests need the shape and the codes as they really are.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["Error"] = {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                }
            },
        }
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.setdefault("responses", {})
                for status, description in COMMON.items():
                    entry = responses.setdefault(status, {"description": description})
                    entry["content"] = error
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if errors and errors[0].get("type") == "json_invalid":
            return JSONResponse(
                error_body("malformed_json", f"request body is not valid JSON: {errors[0].get('msg')}"),
                400,
            )
        return JSONResponse(error_body("invalid_request", _validation_message(exc)), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(
            error_body(code, str(exc.detail)), exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("api.unhandled", path=request.url.path, error_type=type(exc).__name__)
        return JSONResponse(error_body("internal", "internal error; it has been logged"), 500)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before the application reads them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(send)
                    return
        received = 0
        refused = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            if refused:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(error_body("body_too_large", f"request body exceeds {self.limit} bytes")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class RequestHead:
    """Refuse a request whose head no route could take, before any route sees it:

    * a request line plus headers over ``limit`` bytes: 431. The server's parser refuses a head that is
      still incomplete past the limit (which bounds what a trickled or endless head holds); a complete
      head that arrived in one read is measured here;
    * a NUL character in the path or the query: 400. No identifier of this API holds one, and
      PostgreSQL cannot even compare a string that does (every lookup would be a 500).
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        query: bytes = scope.get("query_string") or b""
        size = len(scope.get("raw_path") or b"") + len(query) + 16
        size += sum(len(name) + len(value) + 4 for name, value in scope.get("headers", ()))
        if size > self.limit:
            await _refuse_head(
                scope,
                send,
                431,
                "headers_too_large",
                f"the request line and headers exceed {self.limit} bytes",
            )
        elif "\x00" in scope.get("path", "") or b"%00" in query.lower():
            await _refuse_head(scope, send, 400, "invalid_request", "the URL holds a NUL character (%00)")
        else:
            await self.app(scope, receive, send)


async def _refuse_head(scope: Scope, send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps(error_body(code, message)).encode()
    prefix = "websocket." if scope["type"] == "websocket" else ""
    if prefix and "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": f"{code}: {message}"[:120]})
        return
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": f"{prefix}http.response.start", "status": status, "headers": headers})
    await send({"type": f"{prefix}http.response.body", "body": body})
