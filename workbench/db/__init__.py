"""The database: tables and engine (store), the hash-chained audit log, Alembic migrations."""
