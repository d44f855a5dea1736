"""An S3 filesystem that rides out a store restarting: every call retried with backoff for a bounded time.

The AWS SDK under ``pyarrow.fs.S3FileSystem`` retries a failed request only a few times, tens of milliseconds apart
(its standard strategy's backoff starts at 25 ms), so a store that restarts for a few seconds fails whatever was in
flight: a training run's checkpoint upload, a history record, a shard. :class:`RetryingS3Handler` wraps the SDK's
filesystem in a ``pyarrow.fs.PyFileSystem``, so every caller (cls-ray's own storage calls, Ray Data's reads, Ray
Train's checkpoint uploads and run snapshots, Ray Tune's experiment state) gets the same behaviour:

- a call that fails with a *transient* error (the endpoint refusing or resetting connections, timeouts, HTTP 5xx,
  throttling) is retried after 0.5 s, 1 s, 2 s ... (at most 8 s apart) until ``CLS_RAY_S3_RETRY_S`` seconds
  (default 60) have passed since its first failure; then the last error is raised. Each retry logs a warning naming
  the path. Errors that another attempt cannot fix (missing object, access denied, missing bucket) raise at once;
- an output stream is spooled locally (memory up to 64 MB, then a temporary file) and uploaded when it is closed,
  the whole upload retried the same way, so a half-sent object is never left as the result: S3 makes an object
  visible only once its upload completes;
- input files are the SDK's own (opening them is retried; reads stream natively, with the SDK's retries).

The wrapper pickles as its options (``pyarrow.fs.S3FileSystem`` pickles without credentials when they come from
the environment, as cls-ray's always do), so Ray workers rebuild it from their own environment.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_ENV = "CLS_RAY_S3_RETRY_S"
DEFAULT_RETRY_S = 60.0
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 8.0
SPOOL_BYTES = 64 * 1024 * 1024
COPY_CHUNK = 8 * 1024 * 1024

_PERMANENT_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_PERMANENT = (
    "access denied",
    "access_denied",
    "accessdenied",
    "forbidden",
    "signature",
    "invalidaccesskeyid",
    "invalid_access_key_id",
    "nosuchbucket",
    "no_such_bucket",
    "bucket does not exist",
    "nosuchkey",
    "not found",
    "path does not exist",
)
_TRANSIENT = (
    "curl",
    "connect",
    "timed out",
    "timeout",
    "reset",
    "broken pipe",
    "unreachable",
    "network",
    "service unavailable",
    "slowdown",
    "slow down",
    "internalerror",
    "internal error",
    "throttl",
    "http response code: 5",
    "http status 5",
    "error code: 5",
    "unexpected eof",
    "end of file",
)


def retry_budget_s() -> float:
    """``CLS_RAY_S3_RETRY_S``: how long a failing call keeps being retried (0 turns the retries off)."""
    return float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed: connection and timeout errors, HTTP 5xx, throttling; never a missing
    object, a missing bucket or refused credentials."""
    if not isinstance(exc, OSError) or isinstance(exc, _PERMANENT_TYPES):
        return False
    text = str(exc).lower()
    return not any(k in text for k in _PERMANENT) and any(k in text for k in _TRANSIENT)


def with_retries(what: str, call: Callable[[], T], budget_s: float | None = None) -> T:
    """``call()``, retried on transient errors with exponential backoff for ``budget_s`` (default
    :func:`retry_budget_s`) from its first failure; ``what`` names the operation in the warnings."""
    budget = retry_budget_s() if budget_s is None else budget_s
    first_failure: float | None = None
    delay = FIRST_DELAY_S
    while True:
        try:
            return call()
        except OSError as exc:
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            left = budget - (now - first_failure)
            if not is_transient(exc) or left <= 0:
                raise
            wait = min(delay, left)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            logger.warning(
                "S3 %s failed (%s); retrying in %.1f s (%s: %.0f s of retries left)",
                what,
                reason,
                wait,
                RETRY_ENV,
                left,
            )
            time.sleep(wait)
            delay = min(delay * 2, MAX_DELAY_S)


class _SpooledUpload:
    """A writable file object that collects the bytes and uploads them, with retries, when closed."""

    def __init__(self, fs: pafs.FileSystem, path: str, metadata: Any) -> None:
        self._fs, self._path, self._metadata = fs, path, metadata
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, prefix="cls-ray-upload-")
        self._size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._spool.write(view)
        self._size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def _upload(self) -> None:
        self._spool.seek(0)
        with self._fs.open_output_stream(self._path, metadata=self._metadata) as out:
            shutil.copyfileobj(self._spool, out, COPY_CHUNK)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            with_retries(f"upload of {self._path}", self._upload)
        finally:
            self._spool.close()


class RetryingS3Handler(pafs.FileSystemHandler):
    """The ``pyarrow.fs.PyFileSystem`` handler of :func:`retrying_filesystem` (see the module docstring)."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs = fs

    def __reduce__(self) -> tuple:
        return (RetryingS3Handler, (self.fs,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetryingS3Handler) and self.fs.equals(other.fs)

    def __hash__(self) -> int:
        return id(self)

    def get_type_name(self) -> str:
        return "cls-ray-retrying+" + self.fs.type_name

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return with_retries(f"stat of {paths[0] if len(paths) == 1 else f'{len(paths)} paths'}",
                            lambda: self.fs.get_file_info(paths))  # fmt: skip

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return with_retries(f"listing of {selector.base_dir}", lambda: self.fs.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        with_retries(f"mkdir of {path}", lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._delete(f"delete of {path}", lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        with_retries(
            f"delete of the contents of {path}",
            lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok),
        )

    def delete_root_dir_contents(self) -> None:
        with_retries("delete of the root's contents", lambda: self.fs.delete_dir_contents("", accept_root_dir=True))

    def delete_file(self, path: str) -> None:
        self._delete(f"delete of {path}", lambda: self.fs.delete_file(path))

    def _delete(self, what: str, call: Callable[[], None]) -> None:
        attempts = 0

        def once() -> None:
            nonlocal attempts
            attempts += 1
            try:
                call()
            except FileNotFoundError:
                if attempts == 1:
                    raise  # missing before we started; after a retried attempt it is our own delete that landed

        with_retries(what, once)

    def move(self, src: str, dest: str) -> None:
        with_retries(f"move of {src}", lambda: self.fs.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        with_retries(f"copy of {src}", lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return with_retries(f"read of {path}", lambda: self.fs.open_input_stream(path))

    def open_input_file(self, path: str) -> pa.NativeFile:
        return with_retries(f"read of {path}", lambda: self.fs.open_input_file(path))

    def open_output_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return pa.PythonFile(_SpooledUpload(self.fs, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self.fs.open_append_stream(path, metadata=metadata)  # S3 has no append: the SDK's own error


def retrying_filesystem(fs: pafs.FileSystem) -> pafs.FileSystem:
    """``fs`` with every call retried on transient errors (see the module docstring); ``fs`` itself when
    ``CLS_RAY_S3_RETRY_S`` is 0."""
    return pafs.PyFileSystem(RetryingS3Handler(fs)) if retry_budget_s() > 0 else fs
