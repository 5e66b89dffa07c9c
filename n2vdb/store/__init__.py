"""DuckDB connection, migrations and bulk writers."""

from n2vdb.store.connection import DEFAULT_DB, connect, db_path, read_connection, write_connection

__all__ = ["DEFAULT_DB", "connect", "db_path", "read_connection", "write_connection"]
