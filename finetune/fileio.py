"""File helpers shared by every layer that writes: atomic text writes and the disk a not-yet-created path lands on."""

from __future__ import annotations

import os
import shutil


def write_atomically(path: str, text: str) -> None:
    """Readers see the old file or the new one, never half of it."""
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


def nearest_existing_dir(path: str) -> str:
    """The path itself, or the nearest parent that exists: where a directory would be created."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


def free_bytes(path: str) -> int:
    """Free space on the disk that holds (or will hold) this path."""
    return shutil.disk_usage(nearest_existing_dir(path)).free
