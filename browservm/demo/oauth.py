"""A local OAuth 2.0 authorization server for the ``demo`` provider: real pages, real flow, no internet.

It behaves like the providers' servers the real CLIs sign in against, in the parts a login exercises:

* ``GET /authorize`` shows an HTML sign-in form (email, password, a "Sign in" button) for an
  authorization-code request with PKCE (S256 only). ``POST /authorize`` checks the password, issues a
  single-use code bound to the client, its redirect URI, the PKCE challenge and the state, and redirects
  (303) to ``redirect_uri?code=...&state=...``.
* ``POST /token``: the ``authorization_code`` grant (with ``code_verifier``) and the ``refresh_token``
  grant, which rotates the refresh token: each refresh token works once, as Codex's do.
* ``GET /userinfo`` with a bearer access token.

Demo users: any email address with the password ``demo``, unless ``create_app(users=...)`` names the
accounts and their passwords.

Clients are registered with a loopback redirect URI (``http://127.0.0.1/callback``). As RFC 8252
section 7.3 asks of native-app loopback redirects, any port is accepted; scheme, host and path must match
exactly. An unregistered client or redirect URI gets an error page, never a redirect.

State lives in memory, per app: restart the server and every code and token is gone.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

DEMO_CLIENT_ID = "browservm-demo-cli"
DEMO_REDIRECT_URI = "http://127.0.0.1/callback"
DEMO_PASSWORD = "demo"  # noqa: S105 (the documented password of the demo accounts)

CODE_TTL_S = 120.0
ACCESS_TOKEN_TTL_S = 3600
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class _Grant:
    client_id: str
    redirect_uri: str
    code_challenge: str
    email: str
    scope: str
    expires_at: float


@dataclass
class _Server:
    issuer: str
    clients: dict[str, str]
    users: dict[str, str] | None
    codes: dict[str, _Grant] = field(default_factory=dict)
    access_tokens: dict[str, tuple[str, float]] = field(default_factory=dict)
    refresh_tokens: dict[str, tuple[str, str]] = field(default_factory=dict)
    """refresh token → (client_id, email); a used one is removed at once."""

    def password_ok(self, email: str, password: str) -> bool:
        # Bytes: compare_digest raises TypeError on str with non-ASCII characters (a typed "é").
        expected = DEMO_PASSWORD if self.users is None else self.users.get(email)
        return expected is not None and secrets.compare_digest(password.encode(), expected.encode())

    def redirect_registered(self, client_id: str, redirect_uri: str) -> bool:
        registered = self.clients.get(client_id)
        if registered is None:
            return False
        want, got = urlsplit(registered), urlsplit(redirect_uri)
        if got.scheme != "http" or got.hostname not in _LOOPBACK_HOSTS:
            return False
        try:
            _ = got.port  # raises on a malformed port
        except ValueError:
            return False
        return (got.hostname, got.path, got.query, got.fragment) == (want.hostname, want.path, "", "")

    def issue_tokens(self, client_id: str, email: str) -> dict[str, Any]:
        access = "demo-at-" + secrets.token_urlsafe(24)
        refresh = "demo-rt-" + secrets.token_urlsafe(24)
        self.access_tokens[access] = (email, time.time() + ACCESS_TOKEN_TTL_S)
        self.refresh_tokens[refresh] = (client_id, email)
        account = {"sub": _subject(email), "email": email}
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ACCESS_TOKEN_TTL_S,
            "refresh_token": refresh,
            "scope": "openid email offline_access",
            "id_token": _unsigned_jwt({"iss": self.issuer, "aud": client_id, **account}),
            "account": account,
        }


def create_app(
    issuer_url: str,
    *,
    clients: dict[str, str] | None = None,
    users: dict[str, str] | None = None,
) -> FastAPI:
    """The authorization server at ``issuer_url``.

    ``clients`` maps client ids to their registered loopback redirect URI (default: the demo CLI's);
    ``users`` maps emails to passwords (default: any email, password ``demo``).
    """
    server = _Server(
        issuer=issuer_url.rstrip("/"),
        clients=dict(clients) if clients is not None else {DEMO_CLIENT_ID: DEMO_REDIRECT_URI},
        users=dict(users) if users is not None else None,
    )
    app = FastAPI(title="browservm demo OAuth server", docs_url=None, redoc_url=None)
    seen: deque[dict[str, str]] = deque(maxlen=1000)

    @app.middleware("http")
    async def remember_client(request: Request, call_next: Any) -> Response:
        # Who connected, as this server saw it: what egress tests check (the proxy's address, or not).
        seen.append(
            {
                "address": request.client.host if request.client else "",
                "method": request.method,
                "path": request.url.path,
                "user_agent": request.headers.get("user-agent", ""),
            }
        )
        response: Response = await call_next(request)
        return response

    @app.get("/ip")
    async def caller_address(request: Request) -> Response:
        """The caller's address as plain text: an egress check URL (``BROWSERVM_EGRESS_CHECK_URL``)."""
        return Response(request.client.host if request.client else "", media_type="text/plain")

    @app.get("/clients")
    async def clients_seen() -> list[dict[str, str]]:
        """The last 1000 requests' client addresses and paths (a demo and test server only)."""
        return list(seen)

    @app.get("/.well-known/oauth-authorization-server")
    async def metadata() -> dict[str, Any]:
        return {
            "issuer": server.issuer,
            "authorization_endpoint": f"{server.issuer}/authorize",
            "token_endpoint": f"{server.issuer}/token",
            "userinfo_endpoint": f"{server.issuer}/userinfo",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
        }

    @app.get("/authorize")
    async def authorize_form(request: Request) -> Response:
        params = {k: v for k, v in request.query_params.items()}
        problem = _check_authorize_request(server, params)
        if problem is not None:
            return problem
        return _login_page(server, params)

    @app.post("/authorize")
    async def authorize_submit(request: Request) -> Response:
        params = await _form(request)
        problem = _check_authorize_request(server, params)
        if problem is not None:
            return problem
        email = params.get("email", "").strip().lower()
        if not _EMAIL.match(email) or not server.password_ok(email, params.get("password", "")):
            return _login_page(server, params, error="Wrong email or password.", status_code=401)
        code = secrets.token_urlsafe(24)
        server.codes[code] = _Grant(
            client_id=params["client_id"],
            redirect_uri=params["redirect_uri"],
            code_challenge=params["code_challenge"],
            email=email,
            scope=params.get("scope", ""),
            expires_at=time.time() + CODE_TTL_S,
        )
        query = {"code": code}
        if params.get("state"):
            query["state"] = params["state"]
        return RedirectResponse(f"{params['redirect_uri']}?{urlencode(query)}", status_code=303)

    @app.post("/token")
    async def token(request: Request) -> Response:
        params = await _form(request)
        grant_type = params.get("grant_type")
        if grant_type == "authorization_code":
            return _exchange_code(server, params)
        if grant_type == "refresh_token":
            return _refresh(server, params)
        return _oauth_error(
            "unsupported_grant_type",
            f"grant_type {grant_type!r} is not supported; use authorization_code or refresh_token",
        )

    @app.get("/userinfo")
    async def userinfo(request: Request) -> Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        entry = server.access_tokens.get(token) if scheme.lower() == "bearer" else None
        if entry is None or entry[1] < time.time():
            return JSONResponse(
                {"error": "invalid_token", "error_description": "missing, unknown or expired access token"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return JSONResponse({"sub": _subject(entry[0]), "email": entry[0]})

    return app


def _check_authorize_request(server: _Server, params: dict[str, str]) -> Response | None:
    client_id = params.get("client_id", "")
    redirect_uri = params.get("redirect_uri", "")
    # Until client and redirect URI are known good, errors go on a page: redirecting to an unverified
    # URI would make this server an open redirector.
    if client_id not in server.clients:
        return _error_page(f"Unknown client {client_id!r}.", 400)
    if not server.redirect_registered(client_id, redirect_uri):
        return _error_page(f"The redirect URI {redirect_uri!r} is not registered for {client_id!r}.", 400)
    error = None
    if params.get("response_type") != "code":
        error = ("unsupported_response_type", "response_type must be code")
    elif params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
        error = ("invalid_request", "PKCE is required: code_challenge with code_challenge_method=S256")
    if error is None:
        return None
    query = {"error": error[0], "error_description": error[1]}
    if params.get("state"):
        query["state"] = params["state"]
    return RedirectResponse(f"{redirect_uri}?{urlencode(query)}", status_code=303)


def _exchange_code(server: _Server, params: dict[str, str]) -> Response:
    # Codes are single use: popped before any check, so a failed attempt also burns the code.
    grant = server.codes.pop(params.get("code", ""), None)
    if grant is None or grant.expires_at < time.time():
        return _oauth_error("invalid_grant", "the authorization code is unknown, used or expired")
    if params.get("client_id") != grant.client_id:
        return _oauth_error("invalid_grant", "the code was issued to another client")
    if params.get("redirect_uri") != grant.redirect_uri:
        return _oauth_error("invalid_grant", "redirect_uri differs from the one of the authorization request")
    verifier = params.get("code_verifier", "")
    if not _VERIFIER.match(verifier) or not secrets.compare_digest(_s256(verifier), grant.code_challenge):
        return _oauth_error("invalid_grant", "code_verifier does not match the code_challenge")
    return JSONResponse(server.issue_tokens(grant.client_id, grant.email), headers=_NO_STORE)


def _refresh(server: _Server, params: dict[str, str]) -> Response:
    entry = server.refresh_tokens.pop(params.get("refresh_token", ""), None)
    if entry is None:
        return _oauth_error("invalid_grant", "the refresh token is unknown or was already used")
    client_id, email = entry
    if params.get("client_id") != client_id:
        return _oauth_error("invalid_grant", "the refresh token was issued to another client")
    return JSONResponse(server.issue_tokens(client_id, email), headers=_NO_STORE)


_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _oauth_error(code: str, description: str, status_code: int = 400) -> JSONResponse:
    return JSONResponse(
        {"error": code, "error_description": description}, status_code=status_code, headers=_NO_STORE
    )


async def _form(request: Request) -> dict[str, str]:
    body = (await request.body()).decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _subject(email: str) -> str:
    return "demo-" + hashlib.sha256(email.encode()).hexdigest()[:16]


def _unsigned_jwt(claims: dict[str, Any]) -> str:
    """An ``alg: none`` JWT: shaped like real id_tokens so clients read account details the same way."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part({**claims, 'iat': int(time.time())})}."


_PASSED_THROUGH = (
    "client_id",
    "redirect_uri",
    "response_type",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
)


def _login_page(
    server: _Server, params: dict[str, str], *, error: str = "", status_code: int = 200
) -> HTMLResponse:
    # The form posts to the issuer's own path: the app may be mounted under a prefix (/demo/oauth).
    action = html.escape(urlsplit(server.issuer).path + "/authorize")
    hidden = "\n".join(
        f'<input type="hidden" name="{name}" value="{html.escape(params[name])}">'
        for name in _PASSED_THROUGH
        if name in params
    )
    email = html.escape(params.get("email", ""))
    notice = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in · browservm demo</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; background: #f4f5f7; display: grid; place-items: center;
       min-height: 100vh; margin: 0; }}
form {{ background: #fff; padding: 2rem; border-radius: 8px; box-shadow: 0 2px 12px #0002; width: 20rem; }}
label {{ display: block; margin: .8rem 0 .3rem; }}
input[type=email], input[type=password] {{ width: 100%; box-sizing: border-box; padding: .5rem;
       font-size: 1rem; }}
button {{ margin-top: 1.2rem; width: 100%; padding: .6rem; font-size: 1rem; }}
.error {{ color: #b00020; }} .hint {{ color: #666; font-size: .85rem; }}
</style></head>
<body><form method="post" action="{action}">
<h1>Sign in</h1>
<p>to continue to <strong>{html.escape(params.get("client_id", ""))}</strong></p>
{notice}
{hidden}
<label for="email">Email</label>
<input id="email" name="email" type="email" autocomplete="username" required value="{email}">
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">Sign in</button>
<p class="hint">Demo accounts: any email, password <code>demo</code>.</p>
</form></body></html>"""
    return HTMLResponse(body, status_code=status_code)


def _error_page(message: str, status_code: int) -> HTMLResponse:
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign-in error</title></head>'
        f"<body><h1>Sign-in error</h1><p>{html.escape(message)}</p>"
        "<p>Start the sign-in again from the command line tool.</p></body></html>"
    )
    return HTMLResponse(body, status_code=status_code)
