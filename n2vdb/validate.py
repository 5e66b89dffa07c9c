"""Checks on settings, shared by the Python API and the CLI: nonsense is refused before anything is written.

Messages name the CLI flag (the API's keyword is the same word with underscores).
"""

from __future__ import annotations

import math

from n2vdb.errors import UsageError


def whole(flag: str, value, minimum: int, maximum: int | None = None) -> None:
    """VALUE is an int (not a bool) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{flag} must be a whole number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise UsageError(f"{flag} must be {bound}, got {value}")


def positive(flag: str, value) -> None:
    """VALUE is a finite number above 0 (a learning rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{flag} must be a finite number above 0, got {value!r}")


def choice(flag: str, value, options: tuple[str, ...]) -> None:
    if value not in options:
        raise UsageError(f"{flag} {value!r}: choose one of {', '.join(options)}")


def flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be true or false, got {value!r}")
