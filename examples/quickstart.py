"""From nothing to a signed-in CLI: start a demo sign-in, wait for it, look at the delivered credentials.

With the controller running (``scripts/run.sh``) and the API key it printed on its first start:

    BROWSERVM_API_KEY=bvm_... .venv/bin/python examples/quickstart.py [USER_ID]

Open the link it prints in a browser and sign in to the demo provider (any email, password ``demo``).
``BROWSERVM_URL`` picks another controller (default ``http://127.0.0.1:8080``).
"""

from __future__ import annotations

import contextlib
import sys

from browservm_client import Client, Conflict

# Runs inside the user's CLI VM: where the delivered file is, its mode and size, and its fields with the
# tokens left out (the operator has no business reading them).
SHOW_CREDENTIALS = """
import json, pathlib
path = pathlib.Path.home() / ".browservm-demo" / "credentials.json"
print(f"{path}  mode {path.stat().st_mode & 0o777:o}  {path.stat().st_size} bytes")
for key, value in json.loads(path.read_text()).items():
    print(f"  {key}: {f'<{len(value)} characters>' if key.endswith('_token') else value}")
"""


def main(user_id: str) -> int:
    with Client() as client:
        session = client.sessions.create(user_id=user_id, provider="demo")
        print(f"Sign in here (any email, password 'demo'):\n  {session.viewer_url}", flush=True)
        session = client.sessions.wait(session.id, "completed", timeout=900)
        print(f"Signed in as {session.account.get('email')}; the credentials are sealed and stored.")
        # A new CLI VM gets the stored credentials at once; an existing one (Conflict) got them at sign-in.
        with contextlib.suppress(Conflict):
            client.cli_vms.create(user_id)
        print(f"In the CLI VM of {user_id}:", flush=True)
        result = client.cli_vms.exec(
            user_id,
            ["python3", "-c", SHOW_CREDENTIALS],
            on_output=lambda chunk: print(chunk.data, end="", flush=True),
        )
        return result.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "quickstart-user"))
