"""Opening the clearing database: URL forms, the async engine, and bringing the schema up to date with Alembic.

``sqlite:///ledger.sqlite`` and ``postgresql://...`` are accepted as well as their async driver forms
(``sqlite+aiosqlite://``, ``postgresql+asyncpg://``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

MIGRATIONS = Path(__file__).with_name("migrations")
_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
_MIGRATION_LOCK = 0x594B54  # PostgreSQL advisory lock: workers starting together migrate one at a time


class DatabaseUrlError(ValueError):
    """A --db value that is not a supported database URL."""


def async_url(text_url: str) -> str:
    """The URL with its async driver: sqlite:// → sqlite+aiosqlite://, postgresql:// → postgresql+asyncpg://."""
    try:
        url = make_url(text_url)
    except ArgumentError:
        raise DatabaseUrlError(
            f"database {text_url!r}: expected sqlite:///FILE or postgresql+asyncpg://user@host/db"
        ) from None
    backend = url.get_backend_name()
    if backend not in _DRIVERS:
        raise DatabaseUrlError(f"database {text_url!r}: only SQLite and PostgreSQL are supported")
    if url.drivername == backend:
        url = url.set(drivername=_DRIVERS[backend])
    elif url.drivername != _DRIVERS[backend]:
        raise DatabaseUrlError(f"database {text_url!r}: use the {_DRIVERS[backend]} driver")
    if backend == "sqlite" and not url.database:
        raise DatabaseUrlError(f"database {text_url!r}: give a file, e.g. sqlite:///ledger.sqlite")
    return url.render_as_string(hide_password=False)


def open_engine(text_url: str) -> AsyncEngine:
    """An async engine for the URL. SQLite gets WAL with full sync (a commit survives power loss: the clearing
    acks only what it committed) and a busy timeout so several processes can share the file (30 s, or the URL's
    ``?timeout=S``)."""
    url = async_url(text_url)
    if url.startswith("sqlite"):
        # 30 s unless the URL says otherwise (?timeout=S): connect_args would override the URL's own
        busy = {} if "timeout" in make_url(url).query else {"timeout": 30}
        engine = create_async_engine(url, connect_args=busy)

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()

        return engine
    return create_async_engine(url, pool_size=5, max_overflow=5)


def _alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
    command.upgrade(_alembic_config(connection), "head")


def _revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest Alembic revision (creates it in an empty database)."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)


async def revision(engine: AsyncEngine) -> tuple[str | None, str | None]:
    """(the database's schema revision, the newest this code knows)."""
    async with engine.connect() as connection:
        current = await connection.run_sync(_revision)
    return current, ScriptDirectory.from_config(_alembic_config()).get_current_head()
