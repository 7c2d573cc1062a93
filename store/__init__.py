"""The teacher store: the on-disk cache between teacher dump (stage 1) and student training.

`schema` fixes the format, `writer` fills it (resumable, several writers at once), `reader`
serves exact slot ranges and shuffled batches (the training path), and `checks` holds
`store_info` / `store_verify`. The reader (and torch) is imported on first use, so writer
processes stay light.
"""

from store.schema import SCHEMA_VERSION, StoreLayout, StoreMeta, array_specs
from store.writer import StoreWriter

__all__ = [
    "SCHEMA_VERSION",
    "StoreLayout",
    "StoreMeta",
    "StoreReader",
    "StoreWriter",
    "array_specs",
    "store_info",
    "store_verify",
]


def __getattr__(name: str):
    if name == "StoreReader":
        from store import reader

        return getattr(reader, name)
    if name in ("store_info", "store_verify"):
        from store import checks

        return getattr(checks, name)
    raise AttributeError(f"module 'store' has no attribute '{name}'")
