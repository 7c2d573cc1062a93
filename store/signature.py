"""Signatures of a store's metadata (schema 3): what `store.schema`'s "Signatures" section
describes, as pure functions (the bytes are read and written by `store.location`).

A signature of a JSON object `body` is `{"fields": {name: h}, "sha256": H}`: H the sha256 of the
body's canonical JSON, h the first 16 hex digits of the sha256 of one field's canonical JSON,
nested objects flattened (`recipe.flip_prob`, `manifest.heatmaps`). H proves the body intact;
the field hashes name what differs when it is not, even where an edit changed a value
everywhere it appears. `complete/signed.json` (the signed units) is read and written here too,
through a `store.location.StoreLocation`.
"""

from __future__ import annotations

import hashlib
import json

from distilpose.errors import StoreCorruptError
from distilpose.limits import loads_json
from store.location import StoreLocation
from store.schema import (
    COMPLETE_DIR,
    META_KEY,
    SCHEMA_VERSION,
    SIGNATURE_KEY,
    SIGNED_FILE,
    SIGNED_SINCE,
)

FIELD_HASH_CHARS = 16  # 64 bits per field: enough to name an edit, small beside the body


def canonical(obj: object) -> bytes:
    """The one JSON text of `obj` that is hashed: sorted keys, no spaces, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sha256_of(obj: object) -> str:
    return hashlib.sha256(canonical(obj)).hexdigest()


def flat_fields(body: dict, prefix: str = "") -> dict[str, object]:
    """{dotted name: value} of every leaf of `body` (lists are leaves); an empty object is a
    leaf of its own, so adding its first key is a change of that name too."""
    out: dict[str, object] = {}
    for key, value in body.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_fields(value, name + "."))
        else:
            out[name] = value
    return out


def sign(body: dict) -> dict:
    """The signature of JSON object `body`."""
    fields = {
        name: sha256_of(value)[:FIELD_HASH_CHARS] for name, value in flat_fields(body).items()
    }
    return {"fields": fields, "sha256": sha256_of(body)}


def changed_fields(body: dict, signature: object) -> list[str] | None:
    """None if `body` is what `signature` signed; else the names of the fields that differ
    ("x (added)", "y (removed)"), or ["its signature"] where the body's fields all match and the
    signature itself was damaged."""
    if not isinstance(signature, dict) or not isinstance(signature.get("fields"), dict):
        return ["its signature (missing or not an object)"]
    if signature.get("sha256") == sha256_of(body):
        return None
    signed, now = signature["fields"], sign(body)["fields"]
    changed = [n for n in now if n in signed and signed[n] != now[n]]
    changed += [f"{n} (added)" for n in now if n not in signed]
    changed += [f"{n} (removed)" for n in signed if n not in now]
    return changed or ["its signature"]


def body_of(payload: dict) -> dict:
    """A signed JSON object without its `signature` key (markers carry theirs inside)."""
    return {k: v for k, v in payload.items() if k != SIGNATURE}


def signed_payload(body: dict) -> dict:
    """`body` with its signature added under `signature` (a marker as written)."""
    return {**body, SIGNATURE: sign(body)}


SIGNATURE = "signature"  # the key a marker keeps its own signature under


def read_signed_units(loc: StoreLocation) -> dict[int, str]:
    """{unit: the marker's sha256} of `complete/signed.json` ({} where there is none yet);
    StoreCorruptError if the file is damaged."""
    data = loc.read_signed()
    if data is None:
        return {}
    where = f"{loc}: {COMPLETE_DIR}/{SIGNED_FILE}"
    doc = loads_json(data, where, StoreCorruptError)
    units = doc.get("units") if isinstance(doc, dict) else None
    if not isinstance(units, dict) or doc.get("sha256") != sha256_of(units):
        raise StoreCorruptError(
            f"{where} (the list of signed units) is damaged: its content differs from its "
            "sha256; expected the file the dump wrote (restore it from a copy, or run "
            "`distilpose store-verify STORE --accept-metadata` to sign the markers again)"
        )
    try:
        return {int(u): str(h) for u, h in units.items()}
    except ValueError:
        raise StoreCorruptError(f"{where}: unit names that are not numbers") from None


def write_signed_units(loc: StoreLocation, units: dict[int, str]) -> None:
    """Write `complete/signed.json` for `units` ({unit: marker sha256}), sorted by unit."""
    body = {str(u): units[u] for u in sorted(units)}
    loc.write_signed(
        json.dumps({"units": body, "sha256": sha256_of(body)}, sort_keys=True).encode()
    )


def check_meta_signature(loc: StoreLocation, attrs: dict) -> None:
    """The `distilpose_store` attribute against its signature (schema 3, or wherever one is
    present): an edit is one line naming the fields, before anything is parsed from them."""
    meta, signature = attrs.get(META_KEY), attrs.get(SIGNATURE_KEY)
    version = meta.get("schema_version", 0) if isinstance(meta, dict) else 0
    version = version if isinstance(version, int) else 0
    if version > SCHEMA_VERSION:
        return  # a newer schema: refused by StoreMeta.from_dict, naming its version
    if signature is None and version < SIGNED_SINCE:
        return  # schema 1 and 2: unsigned
    if not isinstance(meta, dict):
        raise StoreCorruptError(f"{loc}: store metadata '{META_KEY}' is not a JSON object")
    changed = changed_fields(meta, signature)
    if changed:
        raise StoreCorruptError(
            f"{loc}: store metadata (zarr.json '{META_KEY}') differs from what was signed: "
            f"{', '.join(changed)}; expected the metadata the dump wrote (restore zarr.json "
            "from a copy, or sign the edit with `distilpose store-verify STORE "
            "--accept-metadata`)"
        )
