"""Safe handling of tar and zip archives.

Archives come from the network or from users, so a member is refused (``DataError`` naming the
archive and the member) when its name is absolute or climbs out with ``..``, when it is a link
that points outside the extraction folder, or when it is a device/FIFO. Extraction happens into a
temporary folder next to the destination and is moved into place only when complete, so an
interrupted extraction never looks like a finished one.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

from vggkit.errors import DataError

# What a damaged archive raises from the standard library, depending on where the damage is.
ARCHIVE_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,  # zip compression methods the stdlib lacks
    RuntimeError,  # encrypted zip members
)


def unsafe_name_reason(name: str) -> str | None:
    """Why an archive member name is unsafe to use as a relative path, or None if it is fine."""
    if not name or "\x00" in name:
        return "an empty or NUL-containing name"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return "an absolute path"
    if ".." in norm.split("/"):
        return "a '..' path component"
    return None


def _inside(root: str, target: str) -> bool:
    """True if the normalised relative path ``target`` stays within ``root`` (both posix)."""
    joined = posixpath.normpath(posixpath.join(root, target)) if root else posixpath.normpath(target)
    return not (joined == ".." or joined.startswith("../") or joined.startswith("/"))


def check_tar_member(archive: Path, member: tarfile.TarInfo) -> None:
    """Raise DataError if ``member`` could write or point outside the extraction folder."""
    reason = unsafe_name_reason(member.name)
    if reason is None and (member.issym() or member.islnk()):
        target = member.linkname
        if not target or target.replace("\\", "/").startswith("/"):
            reason = f"a link to the absolute path {target!r}"
        else:
            # Symlinks resolve relative to their own folder, hard links relative to the root.
            base = posixpath.dirname(member.name) if member.issym() else ""
            if not _inside(base, target):
                reason = f"a link pointing outside the archive ({target!r})"
    if reason is None and not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        reason = "a device, FIFO or other special file"
    if reason is not None:
        raise DataError(f"{archive}: refusing archive member {member.name!r}: {reason}")


def check_zip_member(archive: Path, info: zipfile.ZipInfo) -> None:
    """Raise DataError for a zip member with an unsafe name or stored as a symbolic link."""
    reason = unsafe_name_reason(info.filename)
    mode = info.external_attr >> 16
    if reason is None and info.create_system == 3 and stat.S_ISLNK(mode):
        reason = "a symbolic link"
    if reason is not None:
        raise DataError(f"{archive}: refusing archive member {info.filename!r}: {reason}")


def open_tar(path: Path) -> tarfile.TarFile:
    """Open a (possibly compressed) tar archive, turning damage into a DataError."""
    try:
        return tarfile.open(path, "r:*")
    except ARCHIVE_ERRORS as exc:
        raise DataError(f"{path}: not a readable tar archive ({exc}); delete it and download it again") from None


def safe_members(path: Path, tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """All members of ``tar`` after checking each one; reads the whole index (catches truncation)."""
    try:
        members = tar.getmembers()
    except ARCHIVE_ERRORS as exc:
        raise DataError(f"{path}: truncated or corrupt archive ({exc}); delete it and download it again") from None
    for member in members:
        check_tar_member(path, member)
    return members


def extract_tar(path: Path, dest: Path, top: str) -> Path:
    """Safely extract the tar archive ``path`` whose content sits under folder ``top``.

    The result appears as ``dest/top`` only after every member was extracted.
    """
    final = dest / top
    with open_tar(path) as tar:
        members = safe_members(path, tar)
        tmp = Path(tempfile.mkdtemp(prefix=f".{top}.", suffix=".extracting", dir=dest))
        try:
            try:
                # The stdlib 'data' filter is a second line of defence behind check_tar_member.
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - Python < 3.11.4
                    tar.extractall(tmp, members=members)
            except tarfile.FilterError as exc:
                raise DataError(f"{path}: refusing archive member: {exc}") from None
            except OSError as exc:
                if exc.errno is None:  # gzip's BadGzipFile and friends: damage, not the filesystem
                    raise DataError(f"{path}: truncated or corrupt archive ({exc}); delete it and download it again") from None
                raise DataError(f"cannot extract {path.name} into {dest} ({exc.strerror})") from None
            except ARCHIVE_ERRORS as exc:
                raise DataError(f"{path}: truncated or corrupt archive ({exc}); delete it and download it again") from None
            if not (tmp / top).is_dir():
                raise DataError(f"{path}: archive does not contain the folder {top}/")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp / top, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
