"""Alembic environment: runs on the connection the application hands over (sync or async engine)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from browservm.store.models import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        # `alembic` run by hand: a sync URL given with -x url=sqlite:///path or postgresql://...
        url = context.get_x_argument(as_dictionary=True).get("url")
        if not url:
            raise SystemExit("pass -x url=<sync database url> (e.g. sqlite:///state/browservm.db)")
        with create_engine(url).begin() as own:
            _configure_and_run(own)
        return
    _configure_and_run(connection)


def _configure_and_run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run()
