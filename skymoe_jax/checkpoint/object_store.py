"""orbax's tensorstore specs for checkpoints under `s3://` (orbax 0.12.8 builds them for `gs://` and local paths only).

orbax builds every kvstore spec in one function, `tensorstore_utils.build_kvstore_tspec`, which every caller
(the array handlers, the OCDBT merge) looks up on its module. For an `s3://` directory it would normalise the URL
to `s3:/...` and refuse it as not absolute. `install()` wraps that one function: an `s3://bucket/path` directory is
built as orbax builds `gs://bucket/path` (OCDBT over a remote store: no file locking, read coalescing), and each
`gcs` driver in the result becomes tensorstore's `s3` driver on the same bucket and path, with the endpoint and
region of the standard AWS environment (tensorstore reads the credentials from it itself). orbax exposes no public
hook for a kvstore; `tests/test_object_store.py` checks the exact specs, so a change in orbax fails there.
"""

from __future__ import annotations

import os
from typing import Any

from orbax.checkpoint._src.serialization import tensorstore_utils

_PREFIX = "s3://"


def s3_driver(bucket: str, path: str) -> dict[str, Any]:
    """tensorstore's s3 kvstore for bucket/path, at AWS_ENDPOINT_URL(_S3) and AWS_REGION (or AWS_DEFAULT_REGION)
    when they are set (tensorstore's own defaults otherwise: AWS, the bucket's region).

    With AWS_ACCESS_KEY_ID set, the credentials are the environment's, which AWS's default chain would pick first
    anyway: that chain also reads the profile files, and the AWS C library logs an error line to stderr for each one
    that does not exist. Without it, the default chain (profile, web identity, instance metadata)."""
    spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": path}
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        spec["context"] = {"aws_credentials": {"type": "environment"}}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        spec["endpoint"] = endpoint
    if region:
        spec["aws_region"] = region
    return spec


def _as_s3(spec: Any) -> Any:
    if isinstance(spec, dict):
        if spec.get("driver") in ("gcs", "gcs_grpc"):
            return s3_driver(spec["bucket"], spec["path"])
        return {key: _as_s3(value) for key, value in spec.items()}
    return spec


def kvstore_spec(build, directory, *args, **kwargs) -> dict[str, Any]:
    """build(directory, ...) (orbax's builder), with an s3:// directory built as gs:// and its drivers made s3."""
    where = str(directory)
    if not where.startswith(_PREFIX):
        return build(directory, *args, **kwargs)
    return _as_s3(build("gs://" + where[len(_PREFIX) :], *args, **kwargs))


def install() -> None:
    """Make orbax build s3:// kvstore specs (once: a second call keeps the first wrapper)."""
    build = tensorstore_utils.build_kvstore_tspec
    if getattr(build, "skymoe_s3", False):
        return

    def build_kvstore_tspec(directory, *args, **kwargs):
        return kvstore_spec(build, directory, *args, **kwargs)

    build_kvstore_tspec.skymoe_s3 = True
    tensorstore_utils.build_kvstore_tspec = build_kvstore_tspec
