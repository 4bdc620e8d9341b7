"""Write files and directories whole or not at all, and clean up what a killed writer left behind.

Every temporary prunedm writes is a sibling of its target named `.<target name>.prunedm-tmp-<random>`,
so a later start can recognise and remove it (remove_stale_temps) without touching anything else."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMP_MARK = ".prunedm-tmp-"
_RENAME_EXCHANGE = 2  # linux/fs.h: atomically swap two paths


def _temp_prefix(target: Path) -> str:
    return f".{target.name}{TEMP_MARK}"


def is_temp(path: str | os.PathLike) -> bool:
    """Whether `path` is a temporary written by this module (a file or directory)."""
    name = Path(path).name
    return name.startswith(".") and TEMP_MARK in name


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path` (ending in `suffix`, e.g. ".png" for writers that read the
    format from the name); when the block ends without error it replaces `path` (os.replace, atomic on
    one filesystem), otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=suffix)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` whole or not at all."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` whole or not at all."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; when the block ends without error it takes
    the place of `path`. An existing `path` stays complete and readable until the new directory is
    complete: the two are swapped in one atomic rename where the OS can (Linux renameat2), and the
    old one is removed afterwards. On error the temporary is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path)))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(new: Path, path: Path) -> None:
    if not path.exists():
        os.replace(new, path)
        return
    if _rename_exchange(new, path):  # `new` now holds the old directory
        shutil.rmtree(new, ignore_errors=True)
        return
    # No atomic swap: move the old one to a temporary name first (a kill in between leaves it there,
    # complete, and remove_stale_temps(..., restore=True) puts it back).
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path) + "old-"))
    os.rmdir(old)
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _rename_exchange(a: Path, b: Path) -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def remove_stale_temps(directory: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Remove the temporaries a killed writer left in `directory` (and below it); return them.

    A temporary old directory whose target is missing (a kill between the two renames of a
    non-atomic swap) is renamed back to its target instead of removed. Call it only where no
    other process is writing (e.g. at the start of a job in its --out)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        if is_temp(entry):
            target = entry.with_name(entry.name[1:].split(TEMP_MARK)[0])
            if entry.name.split(TEMP_MARK, 1)[1].startswith("old-") and not target.exists():
                os.replace(entry, target)
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
        elif recursive and entry.is_dir() and not entry.is_symlink():
            removed += remove_stale_temps(entry, recursive=True)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
