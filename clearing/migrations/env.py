"""Alembic environment: migrations run on the connection that ``clearing.db.migrate`` hands over (online only;
the clearing has no offline SQL mode)."""

from __future__ import annotations

from alembic import context

from clearing.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through 'yikatong clearing migrate' (clearing.db.migrate)")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
