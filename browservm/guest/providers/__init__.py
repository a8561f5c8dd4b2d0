"""The login providers: one module per CLI, one registry.

``protocol.PROVIDERS`` lists the names every guest image of this protocol version knows; this registry
must hold exactly those.
"""

from __future__ import annotations

from collections.abc import Mapping

from browservm import protocol
from browservm.guest.providers.base import CliNotInstalled, CredentialsIncomplete, Prompt, Provider
from browservm.guest.providers.claude_code import ClaudeCode
from browservm.guest.providers.codex import Codex
from browservm.guest.providers.demo import Demo
from browservm.guest.providers.gemini_cli import GeminiCli

PROVIDERS: dict[str, type[Provider]] = {p.name: p for p in (ClaudeCode, Codex, GeminiCli, Demo)}
assert set(PROVIDERS) == set(protocol.PROVIDERS), "the registry and protocol.PROVIDERS disagree"


def get_provider(name: str, options: Mapping[str, str]) -> Provider:
    """The provider ``name`` with its options; :class:`ValueError` names the known ones."""
    provider = PROVIDERS.get(name)
    if provider is None:
        raise ValueError(f"unknown provider {name!r}; this guest knows {', '.join(protocol.PROVIDERS)}")
    return provider(options)


__all__ = ["PROVIDERS", "CliNotInstalled", "CredentialsIncomplete", "Prompt", "Provider", "get_provider"]
