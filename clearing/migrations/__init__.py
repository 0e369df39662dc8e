"""Alembic migrations of the clearing database (run by ``clearing.db.migrate``)."""
