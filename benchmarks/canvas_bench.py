"""Pixels once per person (a canvas) against an encoded crop per view: bytes and CPU per sample.

    python -m benchmarks.canvas_bench

On the real people of the 28 COCO train2017 images in /work/shared/data/coco_subset_train, at
the paper's 192x256 input, for the default recipe and the demo's `mild` one:

- per person, the canvas that holds every crop the recipe can draw (`distilpose.data.canvas`),
  encoded as the store encodes a crop (`store.pixels.encode_crop`: JPEG q95 4:4:4, or lossless);
- per view, the crop itself, encoded the same way (what `--pixels jpeg|lossless` stores today);
- the CPU time of a training sample's pixels, one thread, the cells in turn and best of 3 (so
  they share the machine's load alike): decode the view's crop, against decode the person's
  canvas and warp the view from it (`warp_from_canvas`);
- the views per person from which the canvas is the smaller store, and COCO train2017 at 100
  views (149,813 people) with the compact targets of `compact_bench.json`, per pixel layout.

The people here are 86 of COCO's; their sizes set the canvas's (a person no wider than the
crop's largest zoom keeps the image's resolution), so COCO's own mix may differ.
The record: benchmarks/results/canvas_bench.{md,json}, and docs/store.md's paragraph from it
(`--docs` rewrites that alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import cv2

from benchmarks import update_readme_block
from benchmarks.compact_bench import BUDGET_GB, COCO, COCO_INSTANCES, COCO_VIEWS
from benchmarks.compact_bench import DOCS as STORE_DOCS
from benchmarks.compact_bench import RECORD as COMPACT_RECORD
from distilpose.data import MILD_RECIPE, AugmentRecipe
from distilpose.data.canvas import canvas_for, render_canvas, warp_from_canvas
from distilpose.data.coco import load_coco_instances, read_image
from distilpose.data.crop import render_crop, sample_crop_spec
from distilpose.geometry import PAPER
from store.pixels import CANVAS_FROM_VIEWS, decode_crop, encode_crop
from store.schema import DEFAULT_COMPACT

RESULTS = Path(__file__).resolve().parent / "results"
RECORD = RESULTS / "canvas_bench.json"
INPUT = PAPER.input_size  # the paper's 192x256
RECIPES = {"default": AugmentRecipe(), "mild": MILD_RECIPE}
FORMATS = ("jpeg", "lossless")
VIEWS = 4  # views per person timed and measured (crop bytes are per view)


def people() -> list[tuple]:
    """(instance, image) for every person with keypoints of the COCO subset."""
    insts = load_coco_instances(
        COCO / "annotations" / "person_keypoints.json", COCO / "images", train=True
    )
    images = {p: read_image(p) for p in {i.image_path for i in insts}}
    return [(inst, images[inst.image_path]) for inst in insts]


def samples(persons: list[tuple], recipe: AugmentRecipe, pixels: str) -> dict:
    """Per person its encoded canvas, and VIEWS views (spec, encoded crop)."""
    out = []
    for inst, image in persons:
        canvas = canvas_for(inst, recipe, image.shape[1::-1], INPUT)
        blob = encode_crop(render_canvas(image, canvas), pixels)
        views = []
        for v in range(VIEWS):
            spec = sample_crop_spec(inst, recipe, seed=0, view=v, input_size=INPUT)
            crop = render_crop(image, spec, inst.keypoints, INPUT).image
            views.append((spec, encode_crop(crop, pixels)))
        out.append({"canvas": canvas, "blob": blob, "views": views})
    return out


def per_view_crop(rows: list[dict], pixels: str) -> None:
    for row in rows:
        for _, blob in row["views"]:
            decode_crop(blob, pixels, INPUT)


def per_view_canvas(rows: list[dict], pixels: str) -> None:
    for row in rows:
        for spec, _ in row["views"]:
            canvas = row["canvas"]
            pixels_ = decode_crop(row["blob"], pixels, canvas.size)  # a canvas decodes as a crop
            warp_from_canvas(pixels_, spec, canvas, INPUT)


def cpu_ms_per_sample(cells: dict, rounds: int) -> dict[str, float]:
    """CPU ms per view of each cell (a function of no arguments over `n` views), best of
    `rounds`, the cells in turn."""
    best = {name: float("inf") for name in cells}
    for _ in range(rounds):
        for name, (fn, n) in cells.items():
            t0 = time.process_time()
            fn()
            best[name] = min(best[name], (time.process_time() - t0) * 1e3 / n)
    return best


def measure(persons: list[tuple], rounds: int) -> dict:
    cv2.setNumThreads(1)
    record = {}
    for rname, recipe in RECIPES.items():
        for pixels in FORMATS:
            rows = samples(persons, recipe, pixels)
            n = len(rows) * VIEWS
            ms = cpu_ms_per_sample(
                {
                    "crop": (lambda r=rows, p=pixels: per_view_crop(r, p), n),
                    "canvas": (lambda r=rows, p=pixels: per_view_canvas(r, p), n),
                },
                rounds,
            )
            canvas_px = [r["canvas"].size[0] * r["canvas"].size[1] for r in rows]
            crop_bytes = statistics.fmean(len(b) for r in rows for _, b in r["views"])
            canvas_bytes = statistics.fmean(len(r["blob"]) for r in rows)
            record[f"{rname}/{pixels}"] = {
                "recipe": rname,
                "pixels": pixels,
                "people": len(rows),
                "views_timed": n,
                "crop_bytes_per_view": crop_bytes,
                "canvas_bytes_per_person": canvas_bytes,
                "canvas_px_median": statistics.median(canvas_px),
                "crop_px": INPUT[0] * INPUT[1],
                "full_resolution_share": statistics.fmean(r["canvas"].density == 1.0 for r in rows),
                "break_even_views": canvas_bytes / crop_bytes,
                "crop_ms": ms["crop"],
                "canvas_ms": ms["canvas"],
            }
    return record


def coco_rows(record: dict) -> list[dict]:
    """COCO train2017, 100 views, compact targets (compact_bench's record) + each layout's
    pixels: per-view crops grow with the views, a canvas is paid once per person."""
    # compact_bench's own COCO estimate of the targets (labels and stored bases included)
    estimate = json.loads(COMPACT_RECORD.read_text())["coco_estimate"]
    targets_gb = estimate[DEFAULT_COMPACT]["gb_no_pixels"]
    rows = []
    for key, r in record.items():
        crop_gb = COCO_INSTANCES * COCO_VIEWS * r["crop_bytes_per_view"] / 1e9
        canvas_gb = COCO_INSTANCES * r["canvas_bytes_per_person"] / 1e9
        rows.append({"cell": key, "targets_gb": targets_gb, "crop_total_gb": targets_gb + crop_gb,
                     "canvas_total_gb": targets_gb + canvas_gb})  # fmt: skip
    return rows


def format_record(record: dict, machine: str, load: str) -> str:
    lines = [
        "## Pixels once per person (canvas) vs a crop per view (canvas_bench)",
        "",
        f"`python -m benchmarks.canvas_bench`: {record['people']} real COCO people (28 train2017 "
        f"images), input 192x256, {VIEWS} views each; CPU time per sample on one thread, best "
        f"of {record['rounds']}, cells in turn. {machine}; load average {load} at the end.",
        "",
        "| recipe | pixels | crop kB/view | canvas kB/person | canvas px (median) | people at "
        "image resolution | canvas = crops at V | decode crop ms | decode canvas + warp ms | "
        "ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["cells"].values():
        lines.append(
            f"| {r['recipe']} | {r['pixels']} | {r['crop_bytes_per_view'] / 1e3:.1f} | "
            f"{r['canvas_bytes_per_person'] / 1e3:.1f} | {r['canvas_px_median']:,.0f} "
            f"({r['canvas_px_median'] / r['crop_px']:.1f}x a crop) | "
            f"{r['full_resolution_share']:.0%} | {r['break_even_views']:.1f} | "
            f"{r['crop_ms']:.2f} | {r['canvas_ms']:.2f} | {r['canvas_ms'] / r['crop_ms']:.1f}x |"
        )
    lines += [
        "",
        f"COCO train2017, {COCO_VIEWS} views of {COCO_INSTANCES:,} people, compact targets "
        "(compact_bench.json) + pixels:",
        "",
        "| recipe / pixels | targets GB | + a crop per view GB | + a canvas per person GB |",
        "|---|---:|---:|---:|",
    ]
    for r in record["coco"]:
        lines.append(
            f"| {r['cell']} | {r['targets_gb']:.1f} | {r['crop_total_gb']:.1f} | "
            f"{r['canvas_total_gb']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def docs_block(record: dict) -> str:
    """docs/store.md's paragraph on pixels once per person, from the record."""
    cells, coco = record["cells"], {r["cell"]: r for r in record["coco"]}
    d, m = cells["default/jpeg"], cells["mild/jpeg"]
    return (
        "**Pixels once per person (a canvas): `dump-teacher --pixels canvas`, and the default "
        f"from {CANVAS_FROM_VIEWS} views on (`--pixels auto`: from there a canvas is the smaller "
        "store with every recipe below).** A crop per view makes pixel bytes grow with the "
        "views. `distilpose.data.canvas` cuts, per "
        "person, the one picture that holds every crop its recipe can draw (the union of the "
        "bases' reach, cut to the image, at the resolution of the largest zoom; a view warped "
        "from it at the image's resolution is the view from the image, tested), and "
        f"`python -m benchmarks.canvas_bench` measured it on {record['people']} real COCO "
        "people at 192x256 ([record](../benchmarks/results/canvas_bench.md)): with the default "
        f"recipe (rotations up to 90 degrees, scale +-35%, half-body) a JPEG canvas is "
        f"{d['canvas_bytes_per_person'] / 1e3:.1f} kB per person, the size of "
        f"{d['break_even_views']:.1f} crops, and a sample's pixels cost "
        f"{d['canvas_ms']:.2f} ms of CPU (decode the canvas, warp the view) against "
        f"{d['crop_ms']:.2f} ms to decode its crop ({d['canvas_ms'] / d['crop_ms']:.1f}x); "
        f"with the demo's `mild` recipe {m['canvas_bytes_per_person'] / 1e3:.1f} kB "
        f"({m['break_even_views']:.1f} crops) and {m['canvas_ms']:.2f} against "
        f"{m['crop_ms']:.2f} ms. COCO train2017 at {COCO_VIEWS} views with the default "
        f"compact targets (`{DEFAULT_COMPACT}`): "
        f"{coco['default/jpeg']['canvas_total_gb']:.0f} GB with canvases (the default pixels "
        "at that many views) against "
        f"{coco['default/jpeg']['crop_total_gb']:.0f} GB with a crop per view (goal "
        f"<= {BUDGET_GB} GB). A canvas store keeps these canvases (the same encoder, "
        "`store.pixels.encode_crop`), once per person in view 0's slots, and every view of "
        "the dump and of training is warped from the decoded canvas (schema 4, "
        "`store/schema.py`); `store-info` reports `pixel_bytes_per_view` as the canvases' bytes "
        "over every stored view, so it falls as views are added."
    )


def write_docs(record: dict) -> bool:
    return update_readme_block("canvas-bench", docs_block(record), readme=STORE_DOCS)


def run(quick: bool = False, rounds: int = 3) -> str:
    """Measure, write the record and docs/store.md's paragraph; the record's text. `quick`: one
    round."""
    import os

    from benchmarks.__main__ import machine_line

    persons = people()
    rounds = 1 if quick else rounds
    record = {"people": len(persons), "rounds": rounds, "machine": machine_line()}
    record["cells"] = measure(persons, rounds)
    record["coco"] = coco_rows(record["cells"])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = format_record(record, record["machine"], load)
    (RESULTS / "canvas_bench.md").write_text(text)
    RECORD.write_text(json.dumps(record, indent=2, default=str))
    write_docs(record)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--docs", action="store_true", help="Only rewrite docs from the record.")
    args = p.parse_args(argv)
    if args.docs:
        return 0 if write_docs(json.loads(RECORD.read_text())) else 1
    print(run(rounds=args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
