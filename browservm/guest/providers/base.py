"""What a login provider declares, and the small readers providers share.

A provider is everything the login runner must know about one CLI: how to start its login (argv, env,
files to prepare in the home), which URLs it may open (patterns for its terminal output; the ``BROWSER``
hook catches the rest), which prompts to answer with what, which files hold the credentials, when they
are complete, what account they belong to, and which files (with what content) the CLI user's home
needs to be signed in: the *delivery set*.

Paths are relative to the CLI user's home everywhere: the browser sandbox's home while signing in, the
CLI sandbox's home once delivered.
"""

from __future__ import annotations

import abc
import base64
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qs, urlsplit

from browservm import protocol

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

CredentialFiles = Mapping[str, bytes]
"""The provider's credential files present in the home, by relative path (missing ones are absent)."""


class CredentialsIncomplete(Exception):
    """The credential files are missing, partly written or lack a field; the runner keeps watching."""


class CliNotInstalled(Exception):
    """The provider's CLI binary is not where the runner looks; the message says how to install it."""


@dataclass(frozen=True)
class Prompt:
    """A question the CLI asks in its terminal, and the keys that answer it.

    ``pattern`` is matched against the output with escape sequences removed. A prompt is answered at
    most ``times`` times, each time only for text that appeared after the previous answer, because
    terminal UIs redraw a question that is already answered.
    """

    pattern: re.Pattern[str]
    answer: str
    times: int = 1


class Provider(abc.ABC):
    """One CLI's login. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    url_patterns: ClassVar[tuple[re.Pattern[str], ...]] = ()
    """Authorization URLs in the CLI's terminal output (matched after escape sequences are removed)."""
    prompts: ClassVar[tuple[Prompt, ...]] = ()
    credential_files: ClassVar[tuple[str, ...]]
    """Every file the login writes that the delivery set is built from; moved out by ``collect``."""
    unset_env: ClassVar[tuple[str, ...]] = ()
    """Variables removed from the CLI's environment (some make a CLI skip the browser)."""

    def __init__(self, options: Mapping[str, str]) -> None:
        self.options = dict(options)

    @abc.abstractmethod
    def command(self, env: Mapping[str, str]) -> list[str]:
        """The login command's argv; ``env`` is the runner's environment (to find the binary)."""

    def env(self, home: Path) -> dict[str, str]:
        """Variables the CLI needs beyond HOME, DISPLAY, BROWSER and PATH."""
        return {}

    def prepare_home(self, home: Path) -> None:
        """Write the files the CLI must find before it starts (settings, trust lists)."""

    def accepts_url(self, url: str) -> bool:
        """True for an authorization URL worth opening: it names a client and redirects to a loopback
        callback inside this sandbox. That rejects paste-the-code variants (their redirect is a web page)
        and URLs cut short by line wrapping (they lack later parameters)."""
        query = parse_qs(urlsplit(url).query)
        redirect = query.get("redirect_uri", [""])[0]
        return bool(query.get("client_id")) and is_loopback_http(redirect)

    @abc.abstractmethod
    def validate(self, files: CredentialFiles, *, cli_exited: bool) -> None:
        """Raise :class:`CredentialsIncomplete` unless the files are complete and parseable.

        ``cli_exited``: the CLI has ended on its own, so files it writes after the credentials (account
        details) will not come any more; accept what is there if the tokens are.
        """

    @abc.abstractmethod
    def account(self, files: CredentialFiles) -> dict[str, str]:
        """What the files say about the account (email, account id, plan): never a token."""

    def delivery(self, files: CredentialFiles) -> list[protocol.FileBlob]:
        """The complete file set the CLI user's home needs; by default the credential files as they are."""
        return [blob(path, content) for path, content in files.items()]


# ---------------------------------------------------------------------------------------------- readers


def blob(
    path: str, content: bytes, mode: int = 0o600, merge: Literal["replace", "json"] = "replace"
) -> protocol.FileBlob:
    return protocol.FileBlob(
        path=path, content_b64=base64.b64encode(content).decode(), mode=mode, merge=merge
    )


def json_file(files: CredentialFiles, path: str) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`CredentialsIncomplete` if missing, partial or not an object."""
    content = files.get(path)
    if content is None:
        raise CredentialsIncomplete(f"{path} does not exist yet")
    try:
        value = json.loads(content)
    except ValueError:
        raise CredentialsIncomplete(f"{path} is not complete JSON yet") from None
    if not isinstance(value, dict):
        raise CredentialsIncomplete(f"{path} holds {type(value).__name__}, not a JSON object")
    return value


def require_strings(obj: Mapping[str, Any], path: str, *keys: str) -> None:
    for key in keys:
        value = obj.get(key)
        if not isinstance(value, str) or not value:
            raise CredentialsIncomplete(f"{path} has no {key} yet")


def section(obj: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def jwt_claims(token: object) -> dict[str, Any]:
    """The claims of a JWT, unverified: only to read account details the CLI itself received."""
    if not isinstance(token, str) or token.count(".") < 2:
        return {}
    payload = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        return {}
    return claims if isinstance(claims, dict) else {}


def strings(**values: object) -> dict[str, str]:
    """The non-empty string (or number) values, for ``LoginState.account``."""
    return {
        k: str(v)
        for k, v in values.items()
        if isinstance(v, str | int) and not isinstance(v, bool) and v != ""
    }


def is_loopback_http(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS


# ---------------------------------------------------------------------------------------------- binaries


def cli_dir(env: Mapping[str, str]) -> Path:
    """Where ``scripts/install-clis.sh`` installs the CLIs: ``$BROWSERVM_CLI_DIR``, else
    ``${BROWSERVM_CACHE:-~/.cache/browservm}/clis`` (looked up in ``env``, then this process's env)."""
    merged = {**os.environ, **env}
    if merged.get("BROWSERVM_CLI_DIR"):
        return Path(merged["BROWSERVM_CLI_DIR"])
    cache = merged.get("BROWSERVM_CACHE") or str(
        Path(os.environ.get("HOME") or Path.home()) / ".cache/browservm"
    )
    return Path(cache) / "clis"


def locate_cli(binary: str, env: Mapping[str, str]) -> str:
    """The path of an npm-installed CLI: the install dir's ``node_modules/.bin`` first, then ``PATH``."""
    installed = cli_dir(env) / "node_modules" / ".bin" / binary
    if os.access(installed, os.X_OK):
        return str(installed)
    found = shutil.which(binary, path=env.get("PATH") or os.environ.get("PATH"))
    if found is not None:
        return found
    raise CliNotInstalled(
        f"{binary} is not installed: not in {installed.parent} nor on PATH; run scripts/install-clis.sh "
        "(or set BROWSERVM_CLI_DIR to the directory it installed into)"
    )
