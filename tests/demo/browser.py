"""A scripted user at the demo sign-in page: reads the real form, fills it, follows the redirect."""

from __future__ import annotations

import re
from html import unescape

import httpx


def _form_fields(page: str) -> dict[str, str]:
    fields = {}
    for tag in re.findall(r"<input[^>]*>", page):
        name = re.search(r'name="([^"]*)"', tag)
        value = re.search(r'value="([^"]*)"', tag)
        if name:
            fields[name.group(1)] = unescape(value.group(1)) if value else ""
    return fields


async def sign_in(url: str, email: str, password: str = "demo") -> httpx.Response:
    """Open ``url``, type email and password, press "Sign in", follow the redirect to the callback."""
    async with httpx.AsyncClient(timeout=10) as client:
        page = await client.get(url)
        page.raise_for_status()
        assert "Sign in" in page.text
        fields = _form_fields(page.text)
        assert "email" in fields and "password" in fields, "the form lost its inputs"
        fields.update(email=email, password=password)
        action_path = re.search(r'<form method="post" action="([^"]+)"', page.text)
        assert action_path, "the page has no sign-in form"
        action = httpx.URL(url).join(unescape(action_path.group(1)))
        answer = await client.post(action, data=fields)
        if answer.status_code != 303:
            return answer
        return await client.get(answer.headers["location"])
