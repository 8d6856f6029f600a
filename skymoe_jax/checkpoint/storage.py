"""Where a workdir's files are: a local (or shared POSIX) path, or an object-store URL (`s3://bucket/path`,
`gs://bucket/path`). The only module that tells the two apart for the small files; checkpoints go through orbax and
tensorstore (`object_store.py` gives orbax the kvstore spec of a URL).

URLs are read and written with fsspec (s3fs, gcsfs: the `s3` and `gcs` extras), which take their credentials and
endpoint from the standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION or a
profile; GOOGLE_APPLICATION_CREDENTIALS). Object stores have no append, rename or O_EXCL: `create` is a conditional
write (S3's If-None-Match: *, GCS's ifGenerationMatch=0, both behind fsspec's exclusive mode "xb"), and a
modification time is the object's last-modified, by the store's clock. A user mistake (package missing, no
credentials, no bucket, endpoint unreachable) is one WorkdirError sentence naming the fix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

from skymoe_jax.errors import WorkdirError, first_line

SCHEMES = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs")}  # URL scheme -> (fsspec package, the extra installing it)


def is_url(path: str | os.PathLike) -> bool:
    return str(path).split("://", 1)[0] in SCHEMES and "://" in str(path)


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute; a URL without its trailing slashes."""
    return str(path).rstrip("/") if is_url(path) else os.path.abspath(path)


def join(base: str | os.PathLike, *names: str) -> str:
    return "/".join([str(base).rstrip("/"), *names]) if is_url(base) else os.path.join(base, *names)


def split(path: str) -> tuple[str, str]:
    """(parent, name)."""
    if is_url(path):
        parent, _, name = absolute(path).rpartition("/")
        return parent, name
    return os.path.split(absolute(path))


def bucket(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


@contextlib.contextmanager
def _remote(url: str) -> Iterator:
    """The fsspec filesystem of url, with the mistakes a user can fix said in one sentence."""
    scheme = url.split("://", 1)[0]
    package, extra = SCHEMES[scheme]
    try:
        import fsspec

        # Other processes write the workdir (the run, orbax's threads, a second reader): no listing is cached, in
        # this module's filesystems and in those orbax's paths (etils.epath) open.
        fsspec.config.conf.setdefault(scheme, {})["use_listings_cache"] = False
        fs = fsspec.filesystem(scheme)
    except ImportError:
        raise WorkdirError(
            f"{url} is on object storage, which needs the {package} package: pip install 'skymoe-jax[{extra}]'"
        ) from None
    try:
        yield fs
    except FileNotFoundError:
        if not fs.exists(bucket(url)):
            raise WorkdirError(
                f"bucket {bucket(url)} of {url} does not exist (or these credentials cannot see it); create it or "
                "fix the URL"
            ) from None
        raise
    except Exception as e:
        name = type(e).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
            raise WorkdirError(
                f"no credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or "
                "GOOGLE_APPLICATION_CREDENTIALS for gs://"
            ) from None
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"):
            variable = "AWS_ENDPOINT_URL" if scheme == "s3" else "STORAGE_EMULATOR_HOST"
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3" if scheme == "s3" else variable)
            endpoint = endpoint or os.environ.get(variable) or "the default"
            raise WorkdirError(
                f"the object store of {url} cannot be reached (endpoint {endpoint}); check {variable} and the network"
            ) from None
        if isinstance(e, PermissionError):  # s3fs's and gcsfs's name for a 403 (a wrong key, a bucket policy)
            raise WorkdirError(
                f"the object store refused access to {url} ({first_line(e, limit=200)}); check the credentials and "
                "the bucket's policy"
            ) from None
        raise


def check(path: str) -> None:
    """Stop now, in one sentence, if a URL's store cannot be used (a local path is checked where it is written)."""
    if is_url(path):
        with _remote(path) as fs:
            fs.ls(bucket(path))


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    with _remote(path) as fs:
        return fs.exists(path)


def isdir(path: str) -> bool:
    """A local directory, or a URL prefix that holds objects."""
    if not is_url(path):
        return os.path.isdir(path)
    with _remote(path) as fs:
        return fs.isdir(path)


def listdir(path: str) -> list[str]:
    """The names directly under path; [] if there is none."""
    if not is_url(path):
        return os.listdir(path) if os.path.isdir(path) else []
    with _remote(path) as fs:
        if not fs.isdir(path):
            return []
        return sorted(name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(path, detail=False))


def read_bytes(path: str) -> bytes:
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    with _remote(path) as fs:
        return fs.cat_file(path)


def write_bytes(path: str, data: bytes) -> None:
    """Replace path's content (a local file is written in place; an object is replaced whole)."""
    if not is_url(path):
        with open(path, "wb") as f:
            f.write(data)
        return
    with _remote(path) as fs:
        fs.pipe_file(path, data)


def create(path: str, data: bytes) -> bool:
    """Write path only if it does not exist, atomically (O_EXCL; a conditional write): whether this call created it."""
    if not is_url(path):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    with _remote(path) as fs:
        try:
            with fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            if fs.exists(path):
                return False
            raise
    return True


def modified(path: str) -> float:
    """path's modification time in seconds, by the clock of the storage that holds it (FileNotFoundError if gone)."""
    if not is_url(path):
        return os.stat(path).st_mtime
    with _remote(path) as fs:
        return fs.modified(path).timestamp()


def touch(path: str) -> None:
    """Renew path's modification time (an object is written again with its content; FileNotFoundError if gone)."""
    if is_url(path):
        write_bytes(path, read_bytes(path))
    else:
        os.utime(path)


def remove(path: str) -> None:
    """Remove a file or object; nothing if it is gone."""
    if not is_url(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    with _remote(path) as fs, contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def remove_tree(path: str) -> None:
    """Remove a directory, or every object under a URL prefix."""
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    with _remote(path) as fs, contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def makedirs(path: str) -> None:
    """A local directory; nothing on object storage, whose prefixes exist once an object is under them."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def upload(local: str, url: str) -> None:
    """Copy a local file to a URL, replacing the object."""
    with _remote(url) as fs:
        fs.put_file(local, url)
