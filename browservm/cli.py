"""``browservm``: run the controller and administer it from the command line."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer

from browservm import logs
from browservm.settings import Settings, SettingsError, load_settings
from browservm.store import api_keys
from browservm.store import sessions as session_store
from browservm.store.database import Database
from browservm.store.models import Session
from browservm.store.states import IllegalTransition, SessionStatus
from browservm_client import BrowserVMError, Client, ConfigurationError, SessionEnded, WaitTimeout
from browservm_client.models import Provider

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
keys_app = typer.Typer(no_args_is_help=True, help="Operator API keys.")
sessions_app = typer.Typer(no_args_is_help=True, help="Start, inspect and cancel sessions.")
vault_app = typer.Typer(no_args_is_help=True, help="The credential vault's keys.")
image_app = typer.Typer(no_args_is_help=True, help="The guest image every sandbox runs (docs/image.md).")
app.add_typer(keys_app, name="keys")
app.add_typer(sessions_app, name="sessions")
app.add_typer(vault_app, name="vault")
app.add_typer(image_app, name="image")

T = TypeVar("T")


@app.callback()
def _every_command() -> None:
    """Commands print their results on stdout; only warnings are logged, to stderr (serve then logs at
    its own level)."""
    logs.configure("warning", json=False)


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _with_db(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    async def run() -> T:
        db = Database(settings.effective_database_url)
        try:
            await db.migrate()
            return await work(db)
        finally:
            await db.close()

    try:
        return asyncio.run(run())
    except OSError as exc:
        typer.echo(
            f"error: cannot reach the database ({exc}); check BROWSERVM_DATABASE_URL or run 'browservm doctor'",
            err=True,
        )
        raise typer.Exit(1) from None


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (BROWSERVM_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (BROWSERVM_PORT)")] = None,
) -> None:
    """Run the controller. Creates an operator API key on first run and prints it once.

    Stopping it (SIGTERM, Ctrl-C) leaves its sandboxes running for a restart to take over; a guest that
    no controller speaks to for BROWSERVM_GUEST_IDLE_TIMEOUT_S (120 s) ends itself.
    """
    import uvicorn

    from browservm.controller.app import create_app
    from browservm.controller.server import raise_open_file_limit, uvicorn_config

    settings = _settings(host=host, port=port)
    logs.configure(settings.log_level, json=settings.log_json)

    async def first_key(db: Database) -> str | None:
        async with db.session() as session:
            if await api_keys.any_active(session):
                return None
            _key, secret = await api_keys.create(session, name="operator")
            return secret

    secret = _with_db(settings, first_key)
    base = settings.effective_public_url
    if secret:
        typer.echo(f"Operator API key (shown once, keep it): {secret}")
    typer.echo(f"Dashboard: {base}/   API: {base}/v1   OpenAPI: {base}/openapi.json")
    sys.stdout.flush()
    raise_open_file_limit()
    uvicorn.Server(uvicorn_config(create_app(settings), settings)).run()


@app.command()
def doctor() -> None:
    """Check this host: KVM, QEMU, Chromium, Xvfb, coturn, the database, disk; say how to fix what is missing."""
    from browservm import doctor as checks

    settings = _settings()
    results = checks.run(settings)
    width = max(len(r.name) for r in results)
    for result in results:
        mark = "ok" if result.ok else "MISSING" if result.required else "note"
        typer.echo(f"{result.name:<{width}}  {mark:<7}  {result.detail}")
        if not result.ok and result.fix:
            typer.echo(f"{'':<{width}}  {'':<7}  fix: {result.fix}")
    raise typer.Exit(1 if checks.failures(results) else 0)


# ---------------------------------------------------------------------------------------------- keys


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="A label for the key")],
    tenant: Annotated[str, typer.Option(help="Keys of one tenant see the same sessions")] = "default",
) -> None:
    """Create a key; prints the secret alone on stdout (shown once)."""
    settings = _settings()

    async def work(db: Database) -> str:
        async with db.session() as session:
            _key, secret = await api_keys.create(session, name=name, tenant=tenant)
            return secret

    typer.echo(_with_db(settings, work))


@keys_app.command("list")
def keys_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List keys (never their secrets)."""
    settings = _settings()

    async def work(db: Database) -> list[dict[str, Any]]:
        async with db.session() as session:
            return [
                {
                    "id": k.id,
                    "name": k.name,
                    "tenant": k.tenant,
                    "prefix": k.prefix,
                    "created_at": k.created_at.isoformat(),
                    "last_used_at": k.last_used_at.isoformat() if k.last_used_at else None,
                    "revoked": k.revoked_at is not None,
                }
                for k in await api_keys.all_keys(session)
            ]

    rows = _with_db(settings, work)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "revoked" if row["revoked"] else "active"
        typer.echo(f"{row['id']}  {row['prefix']}…  {row['name']}  tenant={row['tenant']}  {state}")


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by id (see 'keys list'); requests with it get 401 at once."""
    settings = _settings()

    async def work(db: Database) -> bool:
        async with db.session() as session:
            return await api_keys.revoke(session, key_id)

    if not _with_db(settings, work):
        typer.echo(f"error: no active key {key_id!r}; see 'browservm keys list'", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


# ---------------------------------------------------------------------------------------------- sessions


def _session_row(s: Session) -> dict[str, Any]:
    return {
        "id": s.id,
        "tenant": s.tenant,
        "user_id": s.user_id,
        "provider": s.provider,
        "status": s.status,
        "reason": s.reason,
        "sandbox_id": s.sandbox_id,
        "created_at": s.created_at.isoformat(),
        "expires_at": s.expires_at.isoformat(),
    }


@sessions_app.command("create")
def sessions_create(
    user: Annotated[str, typer.Option("--user", help="Your id for the end user")],
    provider: Annotated[Provider, typer.Option("--provider", help="The CLI to sign in")],
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the sign-in; exit 0 only if it completes")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits", min=1)] = 900,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Start a sign-in through the API, as an operator's backend does; prints its id and viewer URL.

    Uses BROWSERVM_API_KEY, and BROWSERVM_URL (default: this host's controller, BROWSERVM_PUBLIC_URL).
    """
    base_url = os.environ.get("BROWSERVM_URL") or _settings().effective_public_url
    try:
        with Client(base_url=base_url) as client:
            session = client.sessions.create(user_id=user, provider=provider)
            if as_json:
                typer.echo(session.model_dump_json(indent=2))
            else:
                typer.echo(f"{session.id}  {session.status}  {session.provider}  {session.user_id}")
                typer.echo(f"viewer: {session.viewer_url}")
            if not wait:
                return
            sys.stdout.flush()
            typer.echo("waiting for the user to sign in...", err=True)
            done = client.sessions.wait(session.id, "completed", timeout=timeout)
    except ConfigurationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except SessionEnded as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except WaitTimeout as exc:
        typer.echo(f"error: {exc}; it goes on (see 'browservm sessions show {exc.session_id}')", err=True)
        raise typer.Exit(1) from None
    except BrowserVMError as exc:
        typer.echo(
            f"error: {exc} (is the controller running? 'browservm serve', or set BROWSERVM_URL)", err=True
        )
        raise typer.Exit(1) from None
    account = done.account.get("email") or done.account.get("account_id") or "the user"
    typer.echo(done.model_dump_json(indent=2) if as_json else f"{done.id}  completed  signed in as {account}")


@sessions_app.command("list")
def sessions_list(
    user_id: Annotated[str | None, typer.Option()] = None,
    status: Annotated[SessionStatus | None, typer.Option()] = None,
    tenant: Annotated[str, typer.Option()] = "default",
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Newest first."""
    settings = _settings()

    async def work(db: Database) -> list[dict[str, Any]]:
        async with db.session() as session:
            rows, _ = await session_store.page(
                session, tenant=tenant, user_id=user_id, status=status, limit=limit
            )
            return [_session_row(s) for s in rows]

    rows = _with_db(settings, work)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(
            f"{row['id']}  {row['status']:<13}  {row['provider']:<11}  {row['user_id']}  {row['created_at']}"
        )


@sessions_app.command("show")
def sessions_show(session_id: str) -> None:
    """One session as JSON."""
    settings = _settings()

    async def work(db: Database) -> dict[str, Any] | None:
        async with db.session() as session:
            found = await session_store.get(session, session_id)
            return _session_row(found) if found else None

    row = _with_db(settings, work)
    if row is None:
        typer.echo(f"error: no session {session_id!r}; see 'browservm sessions list'", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps(row, indent=2))


@sessions_app.command("cancel")
def sessions_cancel(session_id: str) -> None:
    """Cancel a session; the running controller destroys its sandbox within one reconcile interval."""
    settings = _settings()

    async def work(db: Database) -> str:
        async with db.session() as session:
            try:
                found = await session_store.transition(
                    session, session_id, SessionStatus.CANCELLED, reason="cancelled from the command line"
                )
            except LookupError:
                return f"error: no session {session_id!r}"
            except IllegalTransition as exc:
                return f"error: session is {exc.current} and can no longer be cancelled"
            return f"cancelled {found.id}"

    message = _with_db(settings, work)
    typer.echo(message, err=message.startswith("error"))
    if message.startswith("error"):
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------- vault


@vault_app.command("rotate")
def vault_rotate(
    reseal: Annotated[bool, typer.Option(help="Re-seal every stored credential under the new key")] = True,
) -> None:
    """Add a new active key to the key file (old keys stay, so old records open) and re-seal records."""
    from browservm.vault import KeyRing, Vault, write_key_file

    settings = _settings()
    if settings.vault_keys:
        typer.echo(
            "error: keys come from BROWSERVM_VAULT_KEYS; add a key there, make it active, restart, then run "
            "'browservm vault reseal'",
            err=True,
        )
        raise typer.Exit(2)
    Vault.from_settings(settings)  # creates the key file on first use
    path = settings.effective_vault_key_file
    ring = KeyRing.from_json(path.read_text(), source=str(path)).rotated()
    write_key_file(path, ring)
    typer.echo(f"active vault key is now {ring.active} ({path})")
    if reseal:
        vault_reseal()


@vault_app.command("reseal")
def vault_reseal() -> None:
    """Re-seal every stored credential set under the active key (after a rotation)."""
    from browservm.store import credentials as credential_store
    from browservm.vault import Sealed, Vault

    settings = _settings()
    vault = Vault.from_settings(settings)

    async def work(db: Database) -> tuple[int, int]:
        changed = total = 0
        async with db.session() as session:
            for record in await credential_store.live_sealed(session):
                total += 1
                sealed = Sealed(key_id=record.key_id, nonce=record.nonce, ciphertext=record.ciphertext)
                if not vault.needs_reseal(sealed):
                    continue
                fresh = vault.reseal(sealed, user_id=record.user_id, provider=record.provider)
                await credential_store.replace_sealed(
                    session, record.id, key_id=fresh.key_id, nonce=fresh.nonce, ciphertext=fresh.ciphertext
                )
                changed += 1
        return changed, total

    changed, total = _with_db(settings, work)
    typer.echo(f"re-sealed {changed} of {total} credential sets under key {vault.active_key_id}")


# ---------------------------------------------------------------------------------------------- image


@image_app.command("build")
def image_build(
    variant: Annotated[
        str, typer.Option(help="browser (Xvfb, Chromium, the CLIs) or minimal (the agent only, for VM tests)")
    ] = "browser",
    rebuild: Annotated[
        bool, typer.Option(help="Build every stage again (picks up Debian's and npm's updates)")
    ] = False,
) -> None:
    """Build the guest image (or find it already built): a Debian tree, its ext4, the kernel files."""
    from browservm.sandbox import image
    from browservm.sandbox.image.progress import RichProgress

    if variant not in image.VARIANTS:
        typer.echo(f"error: --variant must be one of {', '.join(image.VARIANTS)}, not {variant!r}", err=True)
        raise typer.Exit(2)
    settings = _settings()
    try:
        recipe = image.Recipe(variant)
        with RichProgress() as progress:
            result = image.builder_for(settings, progress).build(recipe, rebuild=rebuild)
    except (image.ImageBuildError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    built = result.image
    if result.rebuilt:
        typer.echo(
            f"built {built.path.name} in {result.seconds:.1f} s (stages run: {', '.join(result.rebuilt)})"
        )
    else:
        typer.echo(f"{built.path.name} is up to date (nothing changed)")
    for name, output in built.manifest.outputs.items():
        typer.echo(f"  {name:<14} {output.bytes / 2**20:8.1f} MiB  {built.path / output.path}")
    others = [
        i for i in image.store_for(settings).images() if i.variant == built.variant and i.path != built.path
    ]
    if others:
        typer.echo(
            f"{len(others)} older {built.variant} image(s) remain: 'browservm image prune' removes them"
        )


@image_app.command("list")
def image_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Built images, newest first; * marks each variant's current one."""
    from browservm.sandbox import image

    settings = _settings()
    store = image.store_for(settings)
    current = {built.path for variant in image.VARIANTS if (built := store.current(variant)) is not None}
    rows: list[dict[str, Any]] = [
        {
            "name": built.path.name,
            "variant": built.variant,
            "key": built.key,
            "current": built.path in current,
            "built_at": built.manifest.built_at.isoformat(),
            "path": str(built.path),
            "bytes": {name: output.bytes for name, output in built.manifest.outputs.items()},
        }
        for built in store.images()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no images in {store.root}; build one with 'browservm image build'")
        return
    for row in rows:
        mark = "*" if row["current"] else " "
        sizes = row["bytes"]
        typer.echo(
            f"{mark} {row['name']:<26} built {row['built_at'][:19]}  tree {sizes['tree'] / 2**20:.0f} MiB  "
            f"ext4 {sizes['rootfs.ext4'] / 2**20:.0f} MiB"
        )


@image_app.command("prune")
def image_prune(
    everything: Annotated[
        bool, typer.Option("--all", help="Also remove each variant's current image")
    ] = False,
) -> None:
    """Remove old images and the cached stages no remaining image uses (download caches stay)."""
    from browservm.sandbox import image

    store = image.store_for(_settings())
    with store.locked():
        pruned = store.prune(everything=everything)
    typer.echo(
        f"removed {len(pruned.images)} image(s) and {len(pruned.stages)} cached stage(s) from {store.root}"
    )
    for name in [*pruned.images, *pruned.stages]:
        typer.echo(f"  {name}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
