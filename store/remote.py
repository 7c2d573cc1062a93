"""Object stores (S3 and the like): request limits, and what a refused request means.

A store on S3 is written without renames or locks, which S3 does not have:
- every shard file and every completion marker is one PUT, and a PUT is atomic (the object
  appears whole or not at all), so no temp file and no rename is needed;
- a unit's marker is PUT only after every shard PUT of the unit returned, so a listed marker
  always has its data (S3 has been strongly read-after-write consistent since 2020);
- there are no claims: one writer per unit range. Writers of one remote store split its units
  with `--shard i/n` (or torchrun ranks), or are tasks of one Dask cluster whose scheduler
  gives each unit to one worker at a time (`--cluster`). Two writers on the same unit would
  write the same bytes (the dump is deterministic), so even that race is wasted work, not harm.
"""

from __future__ import annotations

from distilpose.errors import StoreConnectionError

# Every request is bounded: a connection within CONNECT_TIMEOUT_S, each read within
# READ_TIMEOUT_S, and botocore retries a failed one a few times ("standard" mode: throttling and
# transient errors, with backoff) before s3fs's own retries and our per-call timeout.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 20
MAX_ATTEMPTS = 3


def fsspec_options(protocol: str, options: dict) -> dict:
    """`options` (the user's --storage-options) with request limits added for S3 clients; the
    user's own `config_kwargs` entries win."""
    if protocol not in ("s3", "s3a"):
        return dict(options)
    config = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "read_timeout": READ_TIMEOUT_S,
        "retries": {"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
    }
    return {
        # no cached listings: writers in other processes add markers and shards all the time
        "use_listings_cache": False,
        **options,
        "config_kwargs": {**config, **dict(options.get("config_kwargs") or {})},
    }


def denied(e: BaseException, url: str, what: str) -> StoreConnectionError | None:
    """A request the object store refused for its bucket or credentials, as one line (None:
    another error). s3fs maps AccessDenied / InvalidAccessKeyId to PermissionError and a
    missing bucket to FileNotFoundError."""
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    bucket = url.split("://", 1)[-1].split("/", 1)[0]
    if isinstance(e, PermissionError) or "InvalidAccessKeyId" in text or "AccessDenied" in text:
        return StoreConnectionError(
            f"{url}: the object store refused the credentials during {what} ({text}); expected "
            "valid credentials for bucket "
            f"'{bucket}' (--storage-options profile/key/secret, or AWS_* environment variables)"
        )
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return StoreConnectionError(
            f"{url}: bucket '{bucket}' does not exist ({what}); expected an existing bucket "
            "(create it, or check the URL and --storage-options endpoint_url)"
        )
    return None


def check_bucket(fs, url: str) -> None:
    """Fail with one line if the bucket of `url` is missing or the credentials are refused:
    asked once before writing, since a PUT into a missing bucket reads as "no such file"."""
    bucket = url.split("://", 1)[-1].split("/", 1)[0]
    try:
        fs.ls(bucket, refresh=True)
    except FileNotFoundError as e:
        raise StoreConnectionError(
            f"{url}: bucket '{bucket}' does not exist; expected an existing bucket (create it, "
            "or check the URL and --storage-options endpoint_url)"
        ) from e
    except OSError as e:
        err = denied(e, url, "listing the bucket")
        if err is None:
            raise
        raise err from e
