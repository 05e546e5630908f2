"""URIs -> filesystems.

Every path zsad reads or writes is a URI: a local path (absolute or relative), ``file://...`` or an
object-storage URI such as ``s3://bucket/prefix``. :func:`filesystem` turns a URI into an fsspec
filesystem plus the path inside it. S3 settings come from the job spec's ``storage`` section and
fall back to the standard AWS environment variables; :func:`storage_options` resolves them once on
the driver so the same options travel to every worker.

Inputs that cannot be reached or read raise :class:`InputError`: :func:`storage_failure` turns an
fsspec / botocore exception into a message a user can act on (missing bucket, file or prefix, access
denied, no credentials, unreachable endpoint); :func:`open_input` and :func:`read_input_bytes` apply
it to opening and reading an input.
"""

from __future__ import annotations

import os
import posixpath
import urllib.parse
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from pipeline.config import StorageSpec
from pipeline.errors import ZsadError

StorageOptions = dict[str, Any]


class StorageError(ZsadError, OSError):
    """An input or output location that cannot be reached; the message names the URI."""


class InputError(ZsadError, ValueError):
    """An input that cannot be listed or read; the message names the URI and what is wrong with it."""

    exit_code = 2


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file://`` (``s3://``, ``gs://``, ``memory://``...)."""
    return "://" in uri and not uri.startswith("file://")


def protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def storage_options(spec: StorageSpec | None = None, env: dict[str, str] | None = None) -> StorageOptions:
    """Resolve S3 options: spec fields win, then AWS_* environment variables.

    Returns keyword arguments for ``s3fs.S3FileSystem`` (also accepted, and ignored, for local
    paths). Credentials that come from neither are left to botocore's own chain (instance profile).
    """
    spec = spec or StorageSpec()
    env = os.environ if env is None else env
    endpoint = spec.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    key = spec.access_key_id or env.get("AWS_ACCESS_KEY_ID")
    secret = spec.secret_access_key or env.get("AWS_SECRET_ACCESS_KEY")
    region = spec.region or env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
    opts: StorageOptions = {}
    if spec.anon:
        opts["anon"] = True
    if endpoint:
        opts["endpoint_url"] = endpoint
    if key and secret and not spec.anon:
        opts["key"] = key
        opts["secret"] = secret
    if region:
        opts["client_kwargs"] = {"region_name": region}
    return opts


def _options_for(uri: str, options: StorageOptions | None) -> StorageOptions:
    if protocol(uri) in ("s3", "s3a"):
        return dict(options or {})
    return {}


def path_uri(path: str) -> str:
    """A local path as it is stored in the tables: the path itself, or, when its name is not valid
    UTF-8 (bytes the file system decoded with ``surrogateescape``), a ``file://`` URI with those
    bytes percent-encoded (RFC 8089), which :func:`local_path` turns back into the same path."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "file://" + urllib.parse.quote(os.fsencode(path), safe="/")


def local_path(uri: str) -> str:
    """A local URI or path -> the path (``file://`` URIs percent-decoded to the file system's bytes)."""
    if uri.startswith("file://"):
        return os.fsdecode(urllib.parse.unquote_to_bytes(uri[len("file://") :]))
    return uri


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``uri`` -> (fsspec filesystem, path inside it). Local paths are made absolute."""
    if not is_remote(uri):
        uri = os.path.abspath(os.path.expanduser(local_path(uri)))
    try:
        fs, path = url_to_fs(uri, **_options_for(uri, options))
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{uri}: unsupported location ({exc})") from exc
    return fs, path


def normalise(uri: str) -> str:
    """Canonical form of a URI: absolute local paths, ``scheme://bucket/key`` without trailing '/'."""
    if is_remote(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}"
    return os.path.abspath(os.path.expanduser(local_path(uri)))


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme (local paths use os.path.join)."""
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    """Whole object as bytes. Raises FileNotFoundError / PermissionError / StorageError with the URI."""
    fs, path = filesystem(uri, options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such file or object") from None
    except PermissionError as exc:
        raise PermissionError(f"{uri}: access denied ({exc})") from None


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write a whole object; parent folders are created for local paths."""
    fs, path = filesystem(uri, options)
    if not is_remote(uri):
        fs.makedirs(posixpath.dirname(path) or "/", exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(data)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, options)
    return fs.exists(path)


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """An fsspec path back to a full URI (``bucket/key`` -> ``s3://bucket/key``)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return path_uri(path)
    return fs.unstrip_protocol(path)


# --------------------------------------------------------------------------------------------
# Storage failures -> errors a user can act on
# --------------------------------------------------------------------------------------------


def bucket_name(path: str) -> str:
    """The bucket of an object-store path inside its filesystem (``bucket/key`` -> ``bucket``)."""
    return path.split("/", 1)[0]


def _endpoint(fs: Any) -> str:
    endpoint = getattr(fs, "endpoint_url", None)
    if not endpoint:
        endpoint = (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    return endpoint or "the default AWS endpoint"


def is_storage_exception(exc: BaseException) -> bool:
    """True for what a filesystem raises when a location cannot be reached or read: any OSError, and
    the botocore / aiobotocore / aiohttp / s3fs / urllib3 errors, which are not OSErrors."""
    if isinstance(exc, OSError):
        return True
    module = type(exc).__module__ or ""
    return module.startswith(("botocore", "aiobotocore", "aiohttp", "s3fs", "urllib3"))


def storage_failure(uri: str, fs: Any, path: str, exc: BaseException) -> InputError:
    """Translate a filesystem/botocore exception raised for the input ``uri`` (``path`` inside ``fs``)
    into an InputError with a message a user can act on."""
    text = str(exc) or type(exc).__name__
    name = type(exc).__name__
    remote = is_remote(uri)
    if isinstance(exc, FileNotFoundError):
        if remote and ("bucket does not exist" in text.lower() or "NoSuchBucket" in text):
            return InputError(f"input {uri}: bucket {bucket_name(path)!r} does not exist")
        return InputError(f"input {uri}: no such file, folder or prefix")
    if isinstance(exc, PermissionError):
        return InputError(f"input {uri}: access denied ({text})")
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return InputError(
            f"input {uri}: no S3 credentials (set storage.access_key_id/secret_access_key, "
            f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or storage.anon: true) ({text})"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or isinstance(
        exc, (ConnectionError, TimeoutError)
    ):
        return InputError(f"input {uri}: cannot reach endpoint {_endpoint(fs)} ({text})")
    if isinstance(exc, NotADirectoryError):
        return InputError(f"input {uri}: not a folder ({text})")
    return InputError(f"input {uri}: cannot list ({name}: {text})")


def open_input(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """:func:`filesystem` for an input: an unsupported location, or an object-store URI without a
    bucket, is an InputError naming the URI."""
    try:
        fs, path = filesystem(uri, options)
    except StorageError as exc:
        raise InputError(f"input {uri}: {exc}") from exc
    if is_remote(uri) and not path.strip("/"):
        raise InputError(f"input {uri}: no bucket given (expected scheme://bucket/prefix)")
    return fs, path


def read_input_bytes(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> bytes:
    """The whole file ``path`` (inside ``fs``) of the input ``uri`` as bytes; storage failures become
    an InputError naming ``uri``."""
    try:
        with fs.open(path, "rb") as fh:
            return fh.read()
    except Exception as exc:
        if not is_storage_exception(exc):
            raise
        raise storage_failure(uri, fs, path, exc) from exc
