"""Validating and encoding every input file in worker processes, each file under a time bound.

A file is read, hashed (sha256 of its bytes) and fully decoded in a worker process of a ``pebble`` process pool.
A file whose decode takes longer than ``IngestConfig.file_timeout_s`` has its worker killed; a file that crashes
its worker (a decoder segfault) loses only that worker. Either way only that one file is refused.

Stored bytes must decode to the validated RGB image with a plain ``Image.open(...).convert("RGB")``, so the
original bytes are kept only for JPEG or PNG files in ``RGB`` or ``L`` mode, single frame, with no EXIF rotation
and no side above ``max_side``. Everything else is re-encoded from the validated RGB image (resized to fit
``max_side``, aspect kept): as JPEG at ``jpeg_quality`` when the source was lossy (JPEG, WebP, ...), as PNG when it
was lossless, so no new compression artefacts are added to a lossless source.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import multiprocessing
import os
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from typing import Any

from pebble import ProcessExpired, ProcessPool
from PIL import Image

from cls_ray import storage
from cls_ray.data.images import ImageDecodeError, inspect_image

logger = logging.getLogger(__name__)

KEEPABLE_FORMATS = ("JPEG", "PNG")
KEEPABLE_MODES = ("RGB", "L")
LOSSY_FORMATS = frozenset({"JPEG", "MPO", "WEBP", "JPEG2000", "AVIF", "HEIF", "DDS", "BLP", "FPX", "MIC"})
_ENV_PREFIXES = ("AWS_", "CLS_RAY_")
FILES_PER_TASK = 16
"""Files a validation task carries at most (:class:`ValidatorPool`)."""
TASK_SECONDS = 0.05
"""What a task of several files should take: long enough to amortise the round trip to the worker (~0.2 ms), short
enough that a task of files which are each within the time bound never reaches it together."""


@dataclass(frozen=True)
class EncodeOptions:
    """What the workers need from :class:`~cls_ray.config.IngestConfig`."""

    max_pixels: int
    max_side: int
    jpeg_quality: int
    phash: bool = False
    """Also take the image's perceptual hash (``ingest.near_duplicates``), from the image just decoded."""
    phash_later: bool = False
    """With ``phash``: return the hash's input (``phash_thumbnail``, :func:`near_duplicates.thumbnail`) instead of
    the hash, for :func:`validate_many` to hash a task's files together."""
    luma_jpeg: bool = True
    """Validate a JPEG that is kept as it is by decoding its luma plane only (``images.inspect_image``'s
    ``keep_jpeg_side``); off, every file is fully decoded to RGB (the tests compare the two)."""
    return_original: bool = True
    """Return the bytes of a file kept as it is (``image``); off, ``image`` is None for such a file and the shard
    writer reads it again from the source (the Ray engine: no image bytes travel back from its workers)."""


class _TooLarge(Exception):
    pass


def max_file_bytes(max_pixels: int) -> int:
    """Largest file read at all: an uncompressed 16-bit RGBA image of ``max_pixels`` plus 16 MiB of metadata.
    Anything bigger is refused before it is read (a video or archive in a class folder)."""
    return max_pixels * 8 + 16 * 1024 * 1024


def _read(uri: str, limit: int) -> bytes:
    fs, path = storage.resolve(uri)
    if storage.is_remote(uri):
        with fs.open_input_file(path) as f:
            size = f.size()
            if size > limit:
                raise _TooLarge(size)
            return f.read()
    size = os.stat(path).st_size
    if size > limit:
        raise _TooLarge(size)
    with open(path, "rb") as f:
        # read(n) allocates n bytes up front: ask for the size just seen (and then the rest, up to the limit, of a
        # file that grew since), not the limit, or every read maps and unmaps ~0.5 GB
        data = f.read(size + 1)
        if len(data) > size:
            data += f.read(limit + 1 - len(data))
    if len(data) > limit:
        raise _TooLarge(len(data))
    return data


def _encode(decoded: Any, opts: EncodeOptions) -> tuple[bytes, str, bool]:
    img: Image.Image = decoded.image
    resized = max(img.size) > opts.max_side
    if resized:
        img = img.copy()
        img.thumbnail((opts.max_side, opts.max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if decoded.format in LOSSY_FORMATS:
        img.save(buf, format="JPEG", quality=opts.jpeg_quality)
        kind = "jpeg"
    else:
        img.save(buf, format="PNG")
        kind = "png"
    return buf.getvalue(), kind, resized


def validate_file(uri: str, opts: EncodeOptions) -> dict[str, Any]:
    """Read, hash, fully decode and (when needed) re-encode one file; runs in a worker process.

    Returns:
        ``{"sha256", "width", "height", "format", "encoding": "original"|"jpeg"|"png", "resized", "size",
        "image"}`` (``size``: the stored bytes' length; ``"phash"`` with ``opts.phash``) for a valid image, or
        ``{"reason", "detail"}`` for a refused one.
    """
    # Pillow's own bomb guard must not refuse what ingest.max_pixels allows; it is only ever raised, never lowered
    # (this also runs in the caller's process, where other code relies on Pillow's default).
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < opts.max_pixels:
        Image.MAX_IMAGE_PIXELS = opts.max_pixels
    limit = max_file_bytes(opts.max_pixels)
    try:
        data = _read(uri, limit)
    except _TooLarge as exc:
        return {
            "reason": "file_too_large",
            "detail": f"{exc.args[0]} bytes, above the {limit} read for ingest.max_pixels={opts.max_pixels}",
        }
    except OSError as exc:
        return {"reason": "unreadable", "detail": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    digest = hashlib.sha256(data).hexdigest()
    try:
        # A JPEG stored as it is is checked by decoding its luma plane only: the same check of every coefficient,
        # without the RGB conversion and copies, and the grayscale image the hash reads (images.inspect_image)
        decoded = inspect_image(data, opts.max_pixels, keep_jpeg_side=opts.max_side if opts.luma_jpeg else None)
    except ImageDecodeError as exc:
        return {"reason": exc.reason, "detail": str(exc)[:300], "sha256": digest}
    keep = (
        decoded.format in KEEPABLE_FORMATS
        and decoded.source_mode in KEEPABLE_MODES
        and decoded.n_frames == 1
        and not decoded.transposed
        and not decoded.flattened
        and max(decoded.size) <= opts.max_side
    )
    assert keep or not decoded.luma_only, "a luma-only decode is only made of a file kept as it is"
    if keep:
        image, kind, resized = data, "original", False
    else:
        try:
            image, kind, resized = _encode(decoded, opts)
        except (OSError, ValueError) as exc:
            return {"reason": "encode_error", "detail": f"re-encoding failed: {exc}"[:300], "sha256": digest}
    width, height = Image.open(io.BytesIO(image)).size if resized else decoded.size
    extra = {}
    if opts.phash:
        from cls_ray.data import near_duplicates

        if opts.phash_later:
            extra["phash_thumbnail"] = near_duplicates.thumbnail(decoded.image)
        else:
            extra["phash"] = near_duplicates.perceptual_hash(decoded.image)
    return {
        **extra,
        "sha256": digest,
        "width": width,
        "height": height,
        "format": decoded.format,
        "encoding": kind,
        "resized": resized,
        "size": len(image),
        "image": image if kind != "original" or opts.return_original else None,
    }


def _init_worker(env: dict[str, str], quiet: bool) -> None:
    # Workers fork from the forkserver, which may predate the caller's environment (S3 endpoint, credentials).
    for key in [k for k in os.environ if k.startswith(_ENV_PREFIXES)]:
        os.environ.pop(key)
    os.environ.update(env)
    if quiet:
        # libtiff and other C decoders print warnings about hostile files straight to fd 2; each refusal is
        # reported in the manifest instead.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)


def validate_many(
    validate: Callable[[str, EncodeOptions], dict[str, Any]], uris: Sequence[str], opts: EncodeOptions
) -> tuple[list[dict[str, Any]], float]:
    """One pool task: ``validate`` over a few files, in a worker process. Returns the results and the seconds
    taken per file."""
    start = time.perf_counter()
    if opts.phash:
        opts = replace(opts, phash_later=True)  # the task's files are hashed together, below
    results = [validate(uri, opts) for uri in uris]
    hashed = [r for r in results if "phash_thumbnail" in r]
    if hashed:
        from cls_ray.data import near_duplicates

        phashes = near_duplicates.hashes([r.pop("phash_thumbnail") for r in hashed])
        for r, phash in zip(hashed, phashes, strict=True):
            r["phash"] = phash
    return results, (time.perf_counter() - start) / len(uris)


def _refusal(exc: BaseException, timeout_s: float) -> dict[str, Any]:
    """The refusal of a file whose task failed on its own: timed out, crashed its worker, or raised."""
    if isinstance(exc, FutureTimeout):
        return {"reason": "timeout", "detail": f"validation took longer than {timeout_s:g} s (ingest.file_timeout_s)"}
    if isinstance(exc, ProcessExpired):
        return {
            "reason": "decoder_crash",
            "detail": f"the decoder crashed its worker process (exit code {exc.exitcode})",
        }
    return {"reason": "decoder_error", "detail": f"{type(exc).__name__}: {exc}"[:300]}


class ValidatorPool:
    """Worker processes (a ``pebble`` pool) that validate files, each file under a time bound: a file over it has
    its worker killed and is refused with reason ``timeout``; a file that crashes its worker is refused with reason
    ``decoder_crash``; the pool replaces the lost worker and goes on. Reusable across batches of files (the Ray
    engine keeps one per Ray worker process, :mod:`cls_ray.data.ingest_ray`).

    Files travel to the workers a few at a time: one task per file spent more on the round trip to the worker than
    on validating a small JPEG (docs/benchmarks.md, "Ingest"). A task carries as many files as take about
    :data:`TASK_SECONDS` at the rate measured so far (one at first, at most ``files_per_task``), so slow files (large
    photos) go one per task and a task of several stays far below the time bound. A task that times out, crashes
    its worker or raises is run again one file per task, so the bound and the refusal still apply to the one file
    that caused them; the others are validated again, and only a file that fails on its own is refused.

    Args:
        num_workers: worker processes.
        timeout_s: per-file time bound (also the bound of a task of several files, which is then retried a file at
            a time).
        validate: the per-file function run in the workers (a module-level function).
        quiet: silence the workers' stderr (C decoders' warnings about broken files).
        files_per_task: the most files one task carries (fewer when there are few files per worker).
    """

    def __init__(
        self,
        num_workers: int,
        timeout_s: float,
        *,
        validate: Callable[[str, EncodeOptions], dict[str, Any]] = validate_file,
        quiet: bool = True,
        files_per_task: int = FILES_PER_TASK,
    ) -> None:
        env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
        context = multiprocessing.get_context("forkserver")
        # Imported once in the fork server (when this process starts it), not again in every worker.
        context.set_forkserver_preload(["cls_ray.data.validate", "cls_ray.data.near_duplicates"])
        self.num_workers, self.timeout_s, self.validate = num_workers, timeout_s, validate
        self.files_per_task = files_per_task
        self._pool = ProcessPool(
            max_workers=num_workers, context=context, initializer=_init_worker, initargs=(env, quiet)
        )

    def run(self, uris: Sequence[str], opts: EncodeOptions) -> Iterator[tuple[int, dict]]:
        """Validate ``uris``; yields ``(index, result)`` as files finish (any order)."""
        # at most a few tasks' worth per worker, so that the last tasks finish together
        most = max(1, min(self.files_per_task, len(uris) // (self.num_workers * 8)))
        per_file: float | None = None  # seconds, a moving average over finished tasks
        retry: collections.deque[int] = collections.deque()  # files of failed tasks, one task each, first in line
        start = 0
        window = max(8, self.num_workers * 4)  # bounded in-flight work: results hold image bytes
        finished: queue.SimpleQueue = queue.SimpleQueue()  # futures arrive here as they finish, O(1) per task
        pending: dict[Any, tuple[int, int]] = {}
        try:
            while start < len(uris) or retry or pending:
                while (start < len(uris) or retry) and len(pending) < window:
                    if retry:
                        a = retry.popleft()
                        b = a + 1
                    else:
                        size = 1 if per_file is None else int(min(most, max(1, TASK_SECONDS / max(per_file, 1e-6))))
                        a, b = start, min(start + size, len(uris))
                        start = b
                    future = self._pool.schedule(
                        validate_many, args=(self.validate, uris[a:b], opts), timeout=self.timeout_s
                    )
                    pending[future] = (a, b)
                    future.add_done_callback(finished.put)
                future = finished.get()
                a, b = pending.pop(future)
                try:
                    results, seconds = future.result()
                except Exception as exc:  # noqa: BLE001 - any worker failure refuses at most the file that caused it
                    if b - a > 1:  # which file? each again on its own
                        retry.extend(range(a, b))
                        continue
                    results = [_refusal(exc, self.timeout_s)]
                else:
                    per_file = seconds if per_file is None else 0.8 * per_file + 0.2 * seconds
                for k, result in enumerate(results):
                    yield a + k, result
        finally:
            for future in pending:  # an abandoned run leaves no work behind in a reused pool
                future.cancel()

    def close(self) -> None:
        self._pool.close()
        self._pool.join()

    def __enter__(self) -> ValidatorPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def validate_files(
    uris: Sequence[str],
    opts: EncodeOptions,
    num_workers: int,
    timeout_s: float,
    *,
    validate: Callable[[str, EncodeOptions], dict[str, Any]] = validate_file,
    quiet: bool = True,
    files_per_task: int = FILES_PER_TASK,
) -> Iterator[tuple[int, dict]]:
    """Validate ``uris`` in ``num_workers`` processes (a :class:`ValidatorPool` for this call); yields
    ``(index, result)`` as files finish (any order)."""
    with ValidatorPool(num_workers, timeout_s, validate=validate, quiet=quiet, files_per_task=files_per_task) as pool:
        yield from pool.run(uris, opts)
