"""What software computed a probe: recorded with it, so numbers can be traced to the versions behind them."""

from __future__ import annotations

import json
import platform
from importlib import metadata

_PACKAGES = ("n2vdb", "torch", "torchvision", "numpy", "duckdb", "pyarrow", "timm")


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape results (absent optional ones are left out)."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def as_json() -> str:
    return json.dumps(versions(), sort_keys=True)
