"""Alembic environment: runs on the connection ``newsmon.migrate`` hands it."""

from __future__ import annotations

from alembic import context

from newsmon.migrate import target_metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=target_metadata(),
    render_as_batch=True,  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
