"""Atomic file writing: a reader never sees half a file, and a failed write leaves nothing. And
reading that names the file on any decoding error (:func:`read_text`, :func:`read_json`).

Every module of the project that writes a file goes through here. A write goes to a temporary
sibling with a name unique to the writing process (``.NAME.PID.RANDOM.tmp``), is flushed to
disk, and is renamed over the target; on any error the temporary file is removed. Two processes
writing the same file never share a temporary name, so the last rename wins and neither fails.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> save_json({"a": 1}, d / "sub" / "x.json").read_text()
'{\\n  "a": 1\\n}\\n'
>>> sorted(p.name for p in (d / "sub").iterdir())
['x.json']
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def temporary_name(path: Path) -> Path:
    """A sibling of ``path`` that no other writer uses: ``.NAME.PID.RANDOM.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def is_temporary_of(candidate: Path, path: Path) -> bool:
    """Whether ``candidate`` is a temporary file this module made for ``path``."""
    name = candidate.name
    return (candidate.parent == path.parent and name.startswith(f".{path.name}.")
            and name.endswith(TMP_SUFFIX))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through (for writers that take a file name, such
    as ``safetensors.save_file``); it is renamed onto ``path`` when the block ends without an
    error and removed otherwise. Parent folders are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: the writer did not create the file")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; when the block ends without an error it takes
    the place of ``path`` (a folder already there is replaced), otherwise it is removed. A reader
    sees the old folder or the new one, never a half-written one; if the final rename fails, the
    old folder is put back. Leftovers of a killed process are temporary names (see
    :func:`is_temporary_of`), which the next writer may sweep."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = temporary_name(path), temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:
            if old.exists():
                old.rename(path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically. Returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically. Returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def save_json(obj: Any, path: str | Path, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``obj`` as UTF-8 JSON (with a final newline) atomically. Returns the path."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def read_text(path: str | Path, error: type[Exception] = ValueError) -> str:
    """The UTF-8 text of ``path``; a file that is not UTF-8 raises ``error`` naming the file and
    the byte (``FileNotFoundError`` passes through)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def read_json(path: str | Path, error: type[Exception] = ValueError) -> Any:
    """The JSON value in ``path``; text that is not UTF-8 or not JSON raises ``error`` naming the
    file (and the line)."""
    try:
        return json.loads(read_text(path, error))
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def write_lines(path: str | Path, lines: Iterator[str] | list[str]) -> Path:
    """Write ``lines`` (each without its newline) to ``path`` atomically, one per line."""
    return write_text(path, "".join(f"{line}\n" for line in lines))
