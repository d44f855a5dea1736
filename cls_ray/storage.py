"""Every input and output of cls-ray is a URI; this module turns one into a pyarrow filesystem and a path.

A URI is a plain path, ``file://...`` or ``s3://bucket/prefix``. S3 and S3-compatible stores go through
``pyarrow.fs.S3FileSystem``. Endpoint, region and credentials come only from the standard AWS environment
variables and config files (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for an S3-compatible store,
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID`` ...), never from code or URIs, so they never
reach logs, manifests or checkpoints. No other module special-cases S3.

S3-compatible stores (MinIO, Ceph RGW, SeaweedFS...) work out of the box: with an endpoint override and no choice
of the user's, :func:`s3_compat_env` turns the AWS SDKs' optional checksums to ``when_required``
(see :data:`CHECKSUM_VARIABLES`). Transient errors (a store restarting, a reset connection) are retried with
backoff for a bounded time (``CLS_RAY_S3_RETRY_S``, default 60 s; :mod:`cls_ray.retrying_fs`), by every caller of
the filesystem :func:`resolve` returns, Ray Train's checkpoint uploads included; :func:`check_bucket` fails fast
before any work when the endpoint, the credentials or the bucket are wrong.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from functools import lru_cache
from typing import Any

import pyarrow.fs as pafs


class StorageError(OSError):
    """A URI could not be read or written; the message names the URI and what to check."""


#: The AWS SDK settings (environment variables, read by pyarrow's C++ SDK and boto3 alike) for optional checksums.
#: Their SDK default, ``when_supported``, sends uploads aws-chunked with a trailing checksum, which MinIO-code
#: gateways and older Ceph RGW refuse (``HTTP 411 MissingContentLength`` on ``UploadPart``).
CHECKSUM_VARIABLES = ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")
_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_compat_set: dict[str, str] = {}  # what s3_compat_env put into os.environ


def endpoint_override() -> str | None:
    """The S3-compatible store's URL from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; None for AWS S3 itself."""
    return next((os.environ[k] for k in _ENDPOINT_VARIABLES if os.environ.get(k)), None)


def s3_compat_env() -> dict[str, str]:
    """Default :data:`CHECKSUM_VARIABLES` to ``when_required`` in this process's environment when an endpoint
    override is in use and the user has set neither; returns the variables cls-ray set.

    Child processes inherit them (a local Ray instance started afterwards, pebble workers); a Ray cluster that was
    started elsewhere gets the returned variables through the job's runtime env (``ray_connect.ensure_ray``).
    Checksums are then computed where an operation requires them, as every S3-compatible store accepts; AWS S3
    itself (no endpoint override) keeps the SDK defaults.
    """
    if endpoint_override() and not any(k in os.environ and k not in _compat_set for k in CHECKSUM_VARIABLES):
        for key in CHECKSUM_VARIABLES:
            os.environ.setdefault(key, "when_required")
            _compat_set[key] = os.environ[key]
    return {k: v for k, v in _compat_set.items() if os.environ.get(k) == v}


def boto3_config(**kwargs: Any) -> Any:
    """A ``botocore.config.Config`` for boto3 clients cls-ray creates: the same checksum choice as pyarrow's."""
    import botocore.config

    s3_compat_env()
    return botocore.config.Config(
        request_checksum_calculation=os.environ.get(CHECKSUM_VARIABLES[0], "when_supported"),
        response_checksum_validation=os.environ.get(CHECKSUM_VARIABLES[1], "when_supported"),
        **kwargs,
    )


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def absolute(uri: str) -> str:
    """``uri`` with a relative local path made absolute against this process's working directory.

    Call it where a URI leaves the driver: Ray Tune runs each trial in its own directory and a job's workers may
    start elsewhere, so a relative path would name a different place there. Remote and ``file://`` URIs are
    returned unchanged.
    """
    if is_remote(uri) or uri.startswith("file://"):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its scheme."""
    if is_remote(uri) or uri.startswith("file://"):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def _s3_options(max_attempts: int | None = None) -> dict[str, Any]:
    endpoint = endpoint_override()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if max_attempts is None:
        # The SDK's own quick retries (its standard strategy: jittered backoff from 25 ms, well under a second for
        # 6 attempts); riding out a store that restarts for seconds is retrying_fs's bounded retries on top.
        max_attempts = int(os.environ.get("CLS_RAY_S3_MAX_ATTEMPTS", "6"))
    options: dict[str, Any] = {
        "connect_timeout": float(os.environ.get("CLS_RAY_S3_CONNECT_TIMEOUT", "5")),
        "request_timeout": float(os.environ.get("CLS_RAY_S3_REQUEST_TIMEOUT", "60")),
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
    }
    if endpoint:
        options["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            options["scheme"] = "http"
    if region:
        options["region"] = region
    return options


@lru_cache(maxsize=8)
def _s3_filesystem(options_key: str, max_attempts: int | None = None) -> pafs.FileSystem:
    """The S3 filesystem for the current environment: with ``max_attempts`` (a quick check), the SDK's own; without,
    wrapped so every call rides out a store restarting (:mod:`cls_ray.retrying_fs`, ``CLS_RAY_S3_RETRY_S``)."""
    del options_key  # only part of the cache key: the environment the filesystem was built from
    # The SDK reads the checksum variables when a client is built (here, and where Ray unpickles this filesystem).
    s3_compat_env()
    if max_attempts is not None:
        return pafs.S3FileSystem(**_s3_options(max_attempts))
    from cls_ray.retrying_fs import retrying_filesystem

    # Synchronous writes: the wrapper uploads on close, often from one of Arrow's IO threads (copy_files); a
    # background write would queue on that same pool and, with every IO thread waiting in a close, never run.
    return retrying_filesystem(pafs.S3FileSystem(**_s3_options(), background_writes=False))


def _s3_cache_key() -> str:
    keys = (
        *_ENDPOINT_VARIABLES,
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        *CHECKSUM_VARIABLES,
        "CLS_RAY_S3_MAX_ATTEMPTS",
        "CLS_RAY_S3_RETRY_S",
        "CLS_RAY_S3_CONNECT_TIMEOUT",
        "CLS_RAY_S3_REQUEST_TIMEOUT",
    )
    return "\0".join(os.environ.get(k, "") for k in keys)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a URI; the path is what the filesystem's calls take."""
    if not uri:
        raise StorageError("an empty URI was given where a path or s3:// URI is needed")
    if is_remote(uri):
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise StorageError(f"{uri!r} names no bucket: use s3://BUCKET/PREFIX")
        s3_compat_env()  # before the cache key: it may set variables the key holds
        return _s3_filesystem(_s3_cache_key()), path
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def describe_error(uri: str, exc: BaseException) -> str:
    """A one-line reason for a failed storage call, with a hint for the common S3 mistakes."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    hint = ""
    if is_remote(uri):
        low, bucket = text.lower(), _bucket(uri)
        store = endpoint_override() or "AWS S3"
        if "curl" in low or "connect" in low or "timeout" in low or "resolve" in low:
            hint = (
                f" (is the S3 endpoint reachable? cannot reach {store} for bucket {bucket!r}; check "
                f"AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3)"
            )
        elif any(
            k in low
            for k in (
                "access denied",
                "access_denied",
                "forbidden",
                "signature",
                "invalidaccesskeyid",
                "invalid_access_key_id",
            )
        ):
            hint = (
                f" (check the AWS credentials for bucket {bucket!r} at {store}: AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY / AWS_PROFILE)"
            )
        elif "nosuchbucket" in low or "no_such_bucket" in low or "bucket does not exist" in low:
            hint = (
                f" (the bucket does not exist: create bucket {bucket!r} at {store}, or set AWS_ENDPOINT_URL / "
                f"AWS_ENDPOINT_URL_S3 to the store that has it)"
            )
    return f"{uri}: {text}{hint}"


def _bucket(uri: str) -> str:
    return uri[len("s3://") :].split("/", 1)[0]


def check_bucket(uri: str) -> None:
    """Fail fast, before any work, when an ``s3://`` URI's store cannot be used: endpoint refused, credentials
    wrong, bucket missing. One or two requests with a short retry budget; local URIs pass unchecked.

    Raises:
        StorageError: naming the URI, the bucket and the variables to check.
    """
    if not is_remote(uri):
        return
    fs, path = resolve(uri)
    fast = _s3_filesystem(_s3_cache_key(), 2)
    bucket = _bucket(uri)
    try:
        info = fast.get_file_info(bucket)  # HeadBucket
        if info.type == pafs.FileType.NotFound:
            raise StorageError(describe_error(uri, OSError(f"NoSuchBucket: bucket {bucket!r} does not exist")))
    except StorageError:
        raise
    except OSError as exc:
        if "access_denied" not in str(exc).lower():
            raise StorageError(describe_error(uri, exc)) from None
        # HeadBucket needs s3:ListBucket on the whole bucket; a user allowed only a prefix may still list that.
        try:
            fast.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
        except OSError as list_exc:
            raise StorageError(describe_error(uri, list_exc)) from None


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise StorageError(describe_error(uri, exc)) from exc


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type == pafs.FileType.Directory
    except OSError as exc:
        raise StorageError(describe_error(uri, exc)) from exc


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as exc:
        raise StorageError(describe_error(uri, exc)) from exc


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as exc:
        raise StorageError(describe_error(uri, exc)) from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file. Local writes go through a temporary name and a rename, so a reader never sees half a
    file; S3 PUTs are atomic already."""
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as exc:
        raise StorageError(describe_error(uri, exc)) from exc


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def delete(uri: str) -> None:
    """Delete a file or a directory tree; a missing one is not an error."""
    fs, path = resolve(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as exc:
        raise StorageError(describe_error(uri, exc)) from exc


def list_files(uri: str, recursive: bool = True) -> list[pafs.FileInfo]:
    """All files below a directory URI (hidden files included; callers filter)."""
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=False))
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such directory") from exc
    except OSError as exc:
        raise StorageError(describe_error(uri, exc)) from exc
    return [i for i in infos if i.type == pafs.FileType.File]


def copy_file(src: str, dest: str) -> None:
    """Copy one file between any two URIs (local <-> S3) in streamed chunks (``pyarrow.fs.copy_files``).

    A local destination is written under a temporary name and renamed, so a reader never sees half a file.
    """
    src_fs, src_path = resolve(src)
    dest_fs, dest_path = resolve(dest)
    local = isinstance(dest_fs, pafs.LocalFileSystem)
    target = f"{dest_path}.tmp-{uuid.uuid4().hex[:8]}" if local else dest_path
    try:
        if local:
            os.makedirs(os.path.dirname(dest_path), exist_ok=True)
        pafs.copy_files(src_path, target, source_filesystem=src_fs, destination_filesystem=dest_fs)
        if local:
            os.replace(target, dest_path)
    except OSError as exc:
        if local and os.path.exists(target):
            os.remove(target)
        raise StorageError(describe_error(src if not exists_quietly(src) else dest, exc)) from exc


def exists_quietly(uri: str) -> bool:
    """:func:`exists`, False where the storage cannot be reached."""
    try:
        return exists(uri)
    except StorageError:
        return False
