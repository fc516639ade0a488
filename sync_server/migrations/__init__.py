"""Alembic migrations of the sync server's schema; `Database.migrate()` runs them to `head`."""
