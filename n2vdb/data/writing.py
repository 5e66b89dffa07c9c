"""Writing dataset directories: the operating system's refusals (unwritable, not a directory, disk full)
become one-line errors that name the path."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from n2vdb.errors import DatasetError


@contextlib.contextmanager
def os_errors(action: str, where: str | Path) -> Iterator[None]:
    """Turn an OSError inside the block into 'cannot ACTION in WHERE: reason (path)'."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        path = f" ({exc.filename})" if exc.filename else ""
        raise DatasetError(f"cannot {action} in {where}: {reason}{path}; choose a writable directory") from None
