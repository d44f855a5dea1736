"""Finding the input files of ingest: class folders under a local directory or an ``s3://`` prefix.

Two layouts are recognised:

- flat: ``SRC/<class>/**/<file>``; ingest splits it.
- pre-split: ``SRC/train/<class>/...`` plus ``SRC/val/...`` and/or ``SRC/test/...``; the given split is kept and a
  missing ``val`` or ``test`` split is carved off ``train``.

Hidden entries (any path component starting with ``.``) are ignored. Symlinks whose target lies outside SRC are
not followed, nor are symlinked directories (loops, double counting); both are reported as skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from cls_ray import storage

logger = logging.getLogger(__name__)

SPLIT_DIRS = ("train", "val", "test")


class IngestError(ValueError):
    """Ingest cannot go on with this input or output; the message names it and says what to do."""


@dataclass(frozen=True)
class SourceFile:
    """One candidate image."""

    uri: str
    """Where a worker reads it from (local absolute path or s3:// URI)."""
    path: str
    """Relative to SRC, with ``/`` separators; what the manifest and the Parquet ``path`` column show."""
    class_name: str
    split: str | None
    """The split given by a pre-split tree, else None."""


@dataclass
class ScanResult:
    """The candidate files of a source tree and what was set aside while listing it."""

    files: list[SourceFile]
    classes: list[str]
    presplit: bool
    splits_present: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    hidden_ignored: int = 0


def is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


_Listing = tuple[list[tuple[str, str]], list[dict[str, str]], int, list[str]]


def _list_local(src: str) -> _Listing:
    """Walk a local tree without following directory symlinks; returns ``(uri, rel)`` file pairs, skipped
    entries, the number of hidden entries and the relative paths of all directories."""
    root = os.path.realpath(src)
    dirs: list[str] = []
    pairs: list[tuple[str, str]] = []
    skipped: list[dict[str, str]] = []
    hidden = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        if rel_dir and not _refuse_name(rel_dir):
            dirs.append(rel_dir.rstrip("/"))
        for name in sorted(dirnames):
            full = os.path.join(dirpath, name)
            if name.startswith("."):
                hidden += 1
            elif os.path.islink(full):
                inside = _inside(os.path.realpath(full), root)
                reason = "symlink_dir" if inside else "symlink_outside_source"
                skipped.append(
                    {
                        "path": _printable(rel_dir + name),
                        "reason": reason,
                        "detail": "symlinked directories are not followed"
                        if inside
                        else "the symlink leads outside SRC; not followed",
                    }
                )
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not os.path.islink(os.path.join(dirpath, d))
        )
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if name.startswith("."):
                hidden += 1
                continue
            reason = _refuse_entry(full, rel_dir + name, root)
            if reason:
                skipped.append({"path": _printable(rel_dir + name), "reason": reason[0], "detail": reason[1]})
                continue
            pairs.append((full, rel_dir + name))
    return pairs, skipped, hidden, dirs


def _printable(rel: str) -> str:
    return os.fsencode(rel).decode("utf-8", "backslashreplace")  # undecodable bytes shown as \xNN


def _refuse_entry(full: str, rel: str, root: str) -> tuple[str, str] | None:
    """Why a directory entry is not even read, or None."""
    if os.path.islink(full) and not _inside(os.path.realpath(full), root):
        return "symlink_outside_source", "the symlink leads outside SRC; not followed"
    if not os.path.isfile(full):  # FIFOs, sockets, devices (a read could block forever), broken symlinks
        return "not_a_regular_file", "not a regular file"
    return _refuse_name(rel)


def _refuse_name(rel: str) -> tuple[str, str] | None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "bad_filename", "the file name is not valid UTF-8; rename it"
    return None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def list_below(src: str, prefix: str | None = None) -> tuple[list[tuple[str, str]], int]:
    """Every object below ``prefix`` (default: all of the ``s3://`` SRC): ``(uri, path relative to SRC)`` pairs,
    hidden ones left out, and how many were hidden."""
    base = src.rstrip("/")
    _, root = storage.resolve(base)
    pairs: list[tuple[str, str]] = []
    hidden = 0
    for info in storage.list_files(prefix or base):
        rel = info.path[len(root) :].lstrip("/")
        if not rel:
            continue
        if is_hidden(rel):
            hidden += 1
            continue
        pairs.append((f"{base}/{rel}", rel))
    return pairs, hidden


def _list_remote(src: str) -> _Listing:
    pairs, hidden = list_below(src)
    pairs.sort(key=lambda p: p[1])
    return pairs, [], hidden, []


def _check_source(src: str) -> None:
    if storage.is_remote(src):
        fs, path = storage.resolve(src)
        try:
            kind = fs.get_file_info(path).type
        except OSError as exc:
            raise IngestError(f"cannot read SRC: {storage.describe_error(src, exc)}") from None
        if kind.name == "NotFound":
            raise IngestError(f"SRC {src} does not exist (no objects under that prefix)")
        return
    if not os.path.exists(src):
        raise IngestError(f"SRC {src} does not exist")
    if not os.path.isdir(src):
        raise IngestError(f"SRC {src} is not a directory of class folders")


def scan_source(src: str, lister: Callable[[str], _Listing] | None = None) -> ScanResult:
    """List the candidate images under ``src`` and work out the layout and class names.

    Args:
        lister: lists an ``s3://`` SRC instead of :func:`_list_remote` (the Ray engine's parallel listing, which
            returns the same listing).

    Raises:
        IngestError: SRC missing, not a directory, or holding no class folder.
    """
    _check_source(src)
    remote = lister or _list_remote
    try:
        pairs, skipped, hidden, dirs = remote(src) if storage.is_remote(src) else _list_local(src)
    except storage.StorageError as exc:
        raise IngestError(f"cannot list SRC: {exc}") from None
    top_dirs = {rel.split("/")[0] for _, rel in pairs if "/" in rel} | {d for d in dirs if "/" not in d}
    presplit = "train" in top_dirs and top_dirs <= set(SPLIT_DIRS)
    depth = 2 if presplit else 1
    # Class folders without any file still count as classes, so that they fail the "no valid image" check.
    empty_classes = {d.split("/")[depth - 1] for d in dirs if d.count("/") == depth - 1}
    files: list[SourceFile] = []
    for uri, rel in pairs:
        parts = rel.split("/")
        if len(parts) <= depth:
            where = "a split folder" if presplit and len(parts) == 2 else "SRC"
            skipped.append(
                {
                    "path": rel,
                    "reason": "not_in_class_folder",
                    "detail": f"a file directly in {where}, not in a class folder",
                }
            )
            continue
        split = parts[0] if presplit else None
        files.append(SourceFile(uri, rel, parts[depth - 1], split))
    classes = sorted({f.class_name for f in files} | empty_classes)
    if not files:
        raise IngestError(
            f"SRC {src} holds no class folders with files: expected SRC/<class>/<image> "
            f"(or SRC/train/<class>/<image> for a pre-split tree)"
        )
    splits_present = sorted({f.split for f in files if f.split}, key=SPLIT_DIRS.index)
    logger.info(
        "found %d files in %d class folders under %s%s (%d hidden entries ignored)",
        len(files),
        len(classes),
        src,
        f" (pre-split: {', '.join(splits_present)})" if presplit else "",
        hidden,
    )
    return ScanResult(files, classes, presplit, splits_present, skipped, hidden)
