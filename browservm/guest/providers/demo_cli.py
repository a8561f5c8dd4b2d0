"""The demo login CLI: signs in against :mod:`browservm.demo.oauth` the way the real CLIs sign in.

Usage::

    python -m browservm.guest.providers.demo_cli login --issuer http://127.0.0.1:8080/demo-oauth [--confirm]
    python -m browservm.guest.providers.demo_cli whoami [--refresh]

``login`` starts a callback server on a free loopback port, prints ``Open this URL to sign in: URL``,
hands the authorization URL (PKCE S256) to ``$BROWSER``, waits for the redirect, exchanges the code,
writes ``~/.browservm-demo/credentials.json`` (mode 600, atomically) and prints ``Signed in as EMAIL``.
``--confirm`` first asks ``Sign in to ISSUER? [Y/n]``, a prompt like the real CLIs' that the login
runner must answer. ``whoami`` prints the signed-in email and exits 1 when nobody is signed in;
``--refresh`` first trades the refresh token for new tokens (refresh tokens are single use).

Only the standard library: it runs with the guest image's Python and nothing else.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

CLIENT_ID = "browservm-demo-cli"
CREDENTIALS_PATH = Path(".browservm-demo") / "credentials.json"
"""Relative to the user's home."""
CALLBACK_PATH = "/callback"


class SignInError(Exception):
    """The sign-in cannot complete; the message says why and what to do."""


def credentials_file() -> Path:
    return Path(os.environ.get("HOME") or Path.home()) / CREDENTIALS_PATH


def write_credentials(path: Path, credentials: dict[str, Any]) -> None:
    """Write atomically with mode 600: readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(credentials, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _post_form(url: str, fields: dict[str, str]) -> dict[str, Any]:
    request = urllib.request.Request(  # noqa: S310 (the issuer URL is checked to be http or https)
        url,
        data=urlencode(fields).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            body: dict[str, Any] = json.load(response)
            return body
    except urllib.error.HTTPError as exc:
        try:
            detail = json.load(exc)
            reason = f"{detail.get('error')}: {detail.get('error_description')}"
        except ValueError:
            reason = f"HTTP {exc.code}"
        raise SignInError(f"the sign-in server refused the request ({reason})") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SignInError(f"cannot reach the sign-in server at {url}: {exc}") from None


def _credentials_from(issuer: str, tokens: dict[str, Any]) -> dict[str, Any]:
    account = tokens.get("account") or {}
    if not tokens.get("access_token") or not tokens.get("refresh_token") or not account.get("email"):
        raise SignInError("the sign-in server answered without tokens or account; try again")
    return {
        "issuer": issuer,
        "client_id": CLIENT_ID,
        "token_type": tokens.get("token_type", "Bearer"),
        "access_token": tokens["access_token"],
        "refresh_token": tokens["refresh_token"],
        "expires_at": int(time.time()) + int(tokens.get("expires_in", 3600)),
        "account": {"email": account["email"], "sub": account.get("sub", "")},
    }


@dataclass
class _PendingLogin:
    issuer: str
    redirect_uri: str
    state: str
    verifier: str
    done: threading.Event
    email: str | None = None
    error: str | None = None


def _callback_handler(pending: _PendingLogin) -> type[BaseHTTPRequestHandler]:
    class Callback(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path != CALLBACK_PATH:
                self._page(404, "Not found", "This is the demo CLI's sign-in callback.")
                return
            if pending.done.is_set():
                self._page(409, "Already handled", "This sign-in is finished; return to the terminal.")
                return
            params = {k: v[0] for k, v in parse_qs(url.query).items()}
            try:
                pending.email = self._complete(params)
            except SignInError as exc:
                pending.error = str(exc)
                self._page(400, "Sign-in failed", f"{exc}. Return to the terminal.")
            else:
                self._page(200, "Signed in", f"Signed in as {pending.email}. You can close this tab.")
            pending.done.set()

        def _complete(self, params: dict[str, str]) -> str:
            if "error" in params:
                raise SignInError(
                    f"the sign-in server said {params['error']}: {params.get('error_description')}"
                )
            if not secrets.compare_digest(params.get("state", ""), pending.state):
                raise SignInError("the callback's state does not match this sign-in (a stale or forged link)")
            tokens = _post_form(
                f"{pending.issuer}/token",
                {
                    "grant_type": "authorization_code",
                    "code": params.get("code", ""),
                    "redirect_uri": pending.redirect_uri,
                    "client_id": CLIENT_ID,
                    "code_verifier": pending.verifier,
                },
            )
            credentials = _credentials_from(pending.issuer, tokens)
            write_credentials(credentials_file(), credentials)
            email: str = credentials["account"]["email"]
            return email

        def _page(self, status: int, title: str, message: str) -> None:
            body = (
                f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
                f"</title></head><body><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p></body></html>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the terminal shows the sign-in, not an access log."""

    return Callback


def open_browser(url: str) -> bool:
    """Hand the URL to ``$BROWSER`` (a ``:``-separated list of commands, ``%s`` for the URL) as
    the real CLIs do; True when a command was started."""
    for command in filter(None, os.environ.get("BROWSER", "").split(os.pathsep)):
        argv = shlex.split(command)
        argv = [part.replace("%s", url) for part in argv] if "%s" in command else [*argv, url]
        try:
            opener = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError:
            continue
        # Reaped in the background so it does not linger as a zombie while we wait for the callback.
        threading.Thread(target=opener.wait, name="browser-opener", daemon=True).start()
        return True
    return False


def login(issuer: str, *, confirm: bool, timeout_s: float) -> str:
    issuer = issuer.rstrip("/")
    parts = urlsplit(issuer)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SignInError(
            f"--issuer must be an http(s) URL like http://127.0.0.1:8080/demo-oauth, not {issuer!r}"
        )
    if confirm:
        print(f"Sign in to {issuer}? [Y/n] ", end="", flush=True)
        answer = sys.stdin.readline().strip().lower()
        if answer in ("n", "no"):
            raise SignInError("sign-in cancelled")
    verifier = secrets.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    pending = _PendingLogin(issuer, "", secrets.token_urlsafe(16), verifier, threading.Event())
    server = ThreadingHTTPServer(("127.0.0.1", 0), _callback_handler(pending))
    pending.redirect_uri = f"http://127.0.0.1:{server.server_address[1]}{CALLBACK_PATH}"
    query = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": pending.redirect_uri,
        "scope": "openid email offline_access",
        "state": pending.state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    url = f"{issuer}/authorize?{urlencode(query)}"
    thread = threading.Thread(target=server.serve_forever, name="callback", daemon=True)
    thread.start()
    try:
        print(f"Open this URL to sign in: {url}", flush=True)
        if not open_browser(url):
            print("(No $BROWSER set: open the URL yourself.)", flush=True)
        print("Waiting for the browser sign-in...", flush=True)
        if not pending.done.wait(timeout_s):
            raise SignInError(f"no sign-in within {timeout_s:.0f} s; run login again")
    finally:
        server.shutdown()
        server.server_close()
    if pending.error is not None:
        raise SignInError(pending.error)
    assert pending.email is not None
    return pending.email


def whoami(*, refresh: bool) -> str:
    path = credentials_file()
    try:
        credentials = json.loads(path.read_text())
        email: str = credentials["account"]["email"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SignInError(
            f"not signed in ({path} is missing or unreadable); run: "
            "python -m browservm.guest.providers.demo_cli login --issuer URL"
        ) from None
    if refresh:
        tokens = _post_form(
            f"{credentials['issuer']}/token",
            {
                "grant_type": "refresh_token",
                "refresh_token": credentials["refresh_token"],
                "client_id": CLIENT_ID,
            },
        )
        credentials = _credentials_from(credentials["issuer"], tokens)
        write_credentials(path, credentials)
        email = credentials["account"]["email"]
    return email


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="demo_cli", description="Sign in to the browservm demo OAuth server."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    login_parser = commands.add_parser("login", help="sign in through the browser")
    login_parser.add_argument("--issuer", required=True, help="the demo OAuth server's base URL")
    login_parser.add_argument("--confirm", action="store_true", help="ask before starting the sign-in")
    login_parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the browser")
    whoami_parser = commands.add_parser("whoami", help="print the signed-in account")
    whoami_parser.add_argument("--refresh", action="store_true", help="refresh the tokens first")
    args = parser.parse_args(argv)
    try:
        if args.command == "login":
            print(
                f"Signed in as {login(args.issuer, confirm=args.confirm, timeout_s=args.timeout)}", flush=True
            )
        else:
            print(whoami(refresh=args.refresh), flush=True)
    except SignInError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
