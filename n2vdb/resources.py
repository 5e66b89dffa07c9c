"""Locate the SQL directories, both in a source checkout and in an installed wheel."""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def sql_dir(name: str) -> Path:
    """`migrations` or `queries`: inside the wheel (n2vdb/_sql/NAME) or at the repository top level."""
    for candidate in (_PACKAGE / "_sql" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"n2vdb is installed without its {name}/ directory")


def home() -> Path:
    """n2vdb's own files (the built-in concept set, shell history): N2VDB_HOME, else ~/.cache/n2vdb."""
    import os

    return Path(os.environ.get("N2VDB_HOME") or Path.home() / ".cache" / "n2vdb")
