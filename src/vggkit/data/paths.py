"""Where datasets live: the data directory and the decoded-image cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DATA_ENV = "VGGKIT_DATA"


def user_cache_dir() -> Path:
    """The per-user cache folder for vggkit (XDG on Linux, the platform's usual place elsewhere)."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "vggkit" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "vggkit"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vggkit"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``--data-dir``, else ``$VGGKIT_DATA``, else ``<user cache>/data``; not created here."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser().resolve()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return user_cache_dir() / "data"


def writable_dir(path: Path) -> bool:
    """True if ``path`` exists (or can be created) and files can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def cache_dirs(data_dir: Path) -> list[Path]:
    """Candidate folders for decoded-image caches, best first.

    The data directory's ``cache/`` keeps a dataset and its cache together; the per-user cache is
    the fallback for a read-only data directory (e.g. a shared mount).
    """
    dirs = [data_dir / "cache", user_cache_dir() / "decoded"]
    return list(dict.fromkeys(dirs))
