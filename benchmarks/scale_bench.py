"""Scale-out benchmark: the dump on a Dask cluster, and a store read from S3.

    python -m benchmarks.scale_bench [--quick]

What is timed (all in one run, side by side, on a machine other engineers share):
1. `dump-teacher` of the tiny teacher (`tokenpose_tiny`) on demo data, CPU: the plain dump (one
   process), then `--cluster local:1` and `--cluster local:2` (Dask worker processes, one
   thread each). The cluster runs include starting the cluster and each worker loading the
   teacher once; their loop rate is units done per second after the first unit.
2. Reading the same store through `StoreReader.iter_batches` (every teacher target, batches of
   64): from local disk, and from a local S3 server (moto's server mode on 127.0.0.1, s3fs).
   S3 over loopback measures the object-store path's overhead (one request per shard read,
   HTTP, XML), not a network.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

# dummy credentials: moto accepts any, and s3fs must not look for real ones
MOTO_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_s3(bucket: str = "stores") -> Iterator[dict]:
    """A real S3 server on 127.0.0.1 (moto's server mode) with one bucket, for as long as the
    block runs; yields {"endpoint_url", "bucket", "server", "options"} (options: the
    --storage-options of a store there). Sets dummy AWS credentials for the block."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    saved = {k: os.environ.get(k) for k in MOTO_ENV}
    os.environ.update(MOTO_ENV)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir(bucket)
        yield {
            "endpoint_url": endpoint,
            "bucket": bucket,
            "server": server,
            "options": {"endpoint_url": endpoint},
        }
    finally:
        with contextlib.suppress(Exception):  # a test may have stopped it already
            server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
