"""Log redaction: no viewer token, API key, bearer value or secret query parameter survives into a line,
whether structlog or a library's standard logging wrote it. (The served controller is checked end to
end by tests/web/test_log_secrets.py.)"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import structlog

from browservm import logs

TOKEN = "v1.ses_AbCdEf012345.1796174866.GRGK_OCnlzV4t5MbqKjZ4XqIiqBYaSU_oqqEAtfGxM8"
API_KEY = "bvm_jBCKxI8y1gXozUPMJEdZToKFC7Ede9Jr9y4WjMtXs6g"


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        (f'127.0.0.1:1 - "WebSocket /v1/sessions/ses_A/signal?token={TOKEN}" [accepted]', "/signal?token="),
        (f"GET /view/ses_A?transport=ws&token={TOKEN}&mode=vnc HTTP/1.1", "&mode=vnc"),
        (f"Authorization: Bearer {API_KEY}", "Authorization: Bearer "),
        (f"a token pasted alone: {TOKEN}.", "a token pasted alone: "),
        ("GET /demo/oauth/callback?code=abc123&state=xyz", "&state=xyz"),
        (f"the key {API_KEY} leaked", "the key "),
    ],
)
def test_secrets_are_replaced_and_the_rest_kept(text: str, kept: str) -> None:
    cleaned = logs.redact_text(text)
    assert TOKEN not in cleaned and API_KEY not in cleaned and "abc123" not in cleaned
    assert "[redacted]" in cleaned
    assert kept in cleaned


def test_text_without_secrets_is_unchanged() -> None:
    line = "session.status ses_A status=awaiting_user code_challenge_method=S256 exit code 1"
    assert logs.redact_text(line) == line


def test_standard_logging_lines_are_redacted_on_the_handler() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.RedactingFilter())
    logger = logging.getLogger("tests.logs.uvicorn-like")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        # The way uvicorn writes its WebSocket lines: %-style arguments, formatted late.
        logger.warning('%s - "WebSocket %s" [accepted]', "127.0.0.1:5", f"/v1/x/vnc?token={TOKEN}")
        try:
            raise RuntimeError(f"failed with {TOKEN}")
        except RuntimeError:
            logger.exception("boom")
    finally:
        logger.removeHandler(handler)
    written = stream.getvalue()
    assert TOKEN not in written
    assert '"WebSocket /v1/x/vnc?token=[redacted]" [accepted]' in written
    assert "RuntimeError: failed with [redacted]" in written


def test_structlog_values_and_nested_values_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    filters = {handler: list(handler.filters) for handler in root.handlers}
    logs.configure("info", json=True)
    try:
        structlog.get_logger("tests").info(
            "viewer.opened",
            url=f"/view/s?token={TOKEN}",
            nested={"headers": [f"Bearer {API_KEY}"]},
            token="x",
        )
    finally:
        structlog.reset_defaults()
        for handler, kept in filters.items():
            handler.filters = kept
    err = capsys.readouterr().err
    assert TOKEN not in err and API_KEY not in err
    assert '"token": "[redacted]"' in err
    assert "/view/s?token=[redacted]" in err


def test_a_log_files_tail_for_a_failure_is_its_end_redacted(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("boot noise\n" * 1000 + "agent: using key bvm_" + "k" * 24 + " then panic\n")
    tail = logs.file_tail(console, 200)
    assert tail.endswith("then panic\n") and len(tail) <= 200
    assert "bvm_kkkk" not in tail and logs.REDACTED in tail
    assert logs.file_tail(tmp_path / "gone.log") == f"({tmp_path / 'gone.log'} does not exist)"
    assert logs.file_tail(tmp_path / "gone.log", missing="") == ""
