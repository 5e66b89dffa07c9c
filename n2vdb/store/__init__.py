"""DuckDB connection, migrations and bulk writers."""

from n2vdb.store.connection import DEFAULT_DB, connect, db_path, refuse_database_path
from n2vdb.store.database import read_connection, sandbox, write_connection

__all__ = [
    "DEFAULT_DB",
    "connect",
    "db_path",
    "read_connection",
    "refuse_database_path",
    "sandbox",
    "write_connection",
]
