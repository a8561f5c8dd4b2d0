"""A provider CLI's sign-in inside a browser sandbox: :class:`~.runner.LoginRunner` drives it, in a
:class:`~.terminal.Terminal`, with a :class:`~.hook.BrowserHook` that hands its URL over."""

from browservm.guest.login.runner import LoginNotReady, LoginRunner
from browservm.guest.login.terminal import Transcript, redact, terminal_text

__all__ = ["LoginNotReady", "LoginRunner", "Transcript", "redact", "terminal_text"]
