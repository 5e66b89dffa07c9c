"""Checks on settings, shared by the Python API and the CLI: nonsense is refused before anything is written.

Messages name the setting as Python does (`epochs`, `seg_lr`) and carry it as UsageError.param; the
CLI puts its own flag in its place (`--epochs`).
"""

from __future__ import annotations

import math

from n2vdb.errors import UsageError


def whole(name: str, value, minimum: int, maximum: int | None = None) -> None:
    """VALUE is an int (not a bool) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be a whole number, got {value!r}", param=name)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise UsageError(f"{name} must be {bound}, got {value}", param=name)


def positive(name: str, value) -> None:
    """VALUE is a finite number above 0 (a learning rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{name} must be a finite number above 0, got {value!r}", param=name)


def choice(name: str, value, options: tuple[str, ...]) -> None:
    if value not in options:
        raise UsageError(f"{name} {value!r}: choose one of {', '.join(options)}", param=name)


def flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be true or false, got {value!r}", param=name)
