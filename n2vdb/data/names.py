"""Concept names as parts of file names: one sanitiser, so that the uniqueness `data add` checks
holds for every file a report or grid writes."""

from __future__ import annotations

import hashlib

MAX_STEM = 80  # far below the 255-byte limit of common file systems, with room for suffixes


def file_stem(name: str) -> str:
    """NAME with every character that is not a letter or digit replaced by '_'; a long name is cut
    and given a digest of the whole name, so it stays unique and fits a file name."""
    stem = "".join(ch if ch.isalnum() else "_" for ch in name)
    if len(stem.encode()) > MAX_STEM:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        stem = stem.encode()[: MAX_STEM - 13].decode(errors="ignore") + "-" + digest
    return stem


def stem_key(name: str) -> str:
    """What two names must not share: their file stem up to case, as case-insensitive file systems
    (macOS, Windows) would store 'Red' and 'red' in one file."""
    return file_stem(name).casefold()
