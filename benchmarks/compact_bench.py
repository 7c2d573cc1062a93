"""Compact teacher records: bytes per view and the error of every field, measured on real dumps.

    python -m benchmarks.compact_bench [--quick]   # measure; write the record and docs/store.md
    python -m benchmarks.compact_bench --docs      # only rewrite the .md and docs from the record

Every store is written by `dump_teacher` (the path users run: crops, teacher, writer) and read
back through `StoreReader` (the path training runs), one store per mode from the same crops:
1. Errors, with the trained demo teacher (`distilpose/weights/demo_teacher.pth`, its own sizes:
   96x128 crops, 24x32 heatmaps, D=64, 17 keypoint + 192 visual tokens), over the 86 real
   people of the 28 COCO train2017 images in /work/shared/data/coco_subset_train (3 views) and
   over synthetic demo people (the demo's data, 2 views). Reference: the fp16 store (the
   teacher's float32 outputs rounded to half, 1e-3 relative, far below the errors measured).
   Errors are taken on the views after the first, which the compact bases were not fitted on.
2. Bytes per view (`store-info`'s `target_bytes_per_view`, `pixel_bytes_per_view`: the stored
   bytes of complete units) at the paper's sizes: TokenPose-L/W48 (192x256 crops, 48x64
   heatmaps, D=192, 17 + 256 tokens) with untrained, seeded weights (none can be downloaded
   here; its errors say nothing about a trained teacher's and are not reported), over real COCO
   people, a JPEG crop per view; and the COCO train2017 arithmetic for 100 views from them.
3. The in-process read of the teacher targets (read, check, decode) per mode at those sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import update_readme_block
from store.schema import COMPACT, DEFAULT_COMPACT

RESULTS = Path(__file__).resolve().parent / "results"
RECORD = RESULTS / "compact_bench.json"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "store.md"
COCO = Path("/work/shared/data/coco_subset_train")
COCO_INSTANCES = 149_813  # person instances with keypoints in COCO train2017
COCO_VIEWS = 100
BUDGET_GB = 250  # issue 28: 100 views of COCO train2017 in at most this much
# every setting once, by the name a new store gets (`compact` is DEFAULT_COMPACT's there)
MODES = ("fp16", "lossy", *(m for m in COMPACT if m != "compact"))
TOKENS = ("keypoint_tokens", "visual_tokens")
OUTPUTS = ("heatmaps", *TOKENS)


def dump(teacher: Path, ann: Path, images: Path, out: Path, mode: str, **kw) -> dict:
    """One store through `dump_teacher`; its store-info and the dump's wall time."""
    from distilpose.training.runs import DumpRun
    from store.checks import store_info
    from teacher_dump import dump_teacher

    t0 = time.perf_counter()
    run = DumpRun(str(teacher), str(ann), str(images), str(out), mode=mode, device="cpu",
                  workers=0, batch_size=16, **{"pixels": "jpeg", **kw})  # fmt: skip
    dump_teacher(run)
    return {**store_info(out), "dump_s": time.perf_counter() - t0}


def read_views(path: Path, views: list[int]) -> dict[str, np.ndarray]:
    """Every real sample of `views`, teacher outputs decoded to float32, ordered by (view,
    person): `key` [n, 2]. Each mode's own layout places them in its own slots (a compact store's
    chunks are larger), so samples are matched across modes by that key, not by slot."""
    from store import StoreReader

    reader = StoreReader.open(path)
    fields = ("view", "instance", "keypoints", "weights", "heatmaps", *TOKENS)
    parts = [reader.read_chunk(a, b, fields, np.float32) for a, b in reader.chunks(views)]
    rows = {f: np.concatenate([p[f] for p in parts]) for f in fields}
    real = rows["instance"] >= 0  # padding slots out
    order = np.lexsort((rows["instance"][real], rows["view"][real]))
    out = {f: a[real][order] for f, a in rows.items() if f not in ("view", "instance")}
    return {**out, "key": np.stack([rows["view"][real], rows["instance"][real]], -1)[order]}


def _rel(a: np.ndarray, ref: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Relative L2 error over `axes` (per sample, or per token)."""
    err = np.sqrt(((a - ref) ** 2).sum(axes))
    return err / np.maximum(np.sqrt((ref**2).sum(axes)), 1e-12)


def field_errors(ref: dict, got: dict, geometry) -> dict:
    """Each field of `got` against `ref` (same slots): heatmaps (relative L2 per sample, max
    error / peak), peak position (argmax pixel kept, sub-pixel decode in heatmap px), tokens
    (relative L2 and cosine per token), and what the sh and cs losses read from the heatmaps."""
    from distilpose.data.codecs import HeatmapCodec

    assert np.array_equal(ref["key"], got["key"])
    hr, hg = ref["heatmaps"], got["heatmaps"]
    n, k = hr.shape[:2]
    rel = _rel(hg, hr, (1, 2, 3))
    peak = hr.reshape(n, k, -1).max(-1)
    codec = HeatmapCodec(geometry)
    moved = np.linalg.norm(codec.decode(hg)[0] - codec.decode(hr)[0], axis=-1) / geometry.stride[0]
    out = {
        "heatmaps_rel_l2": float(rel.mean()),
        "heatmaps_rel_l2_p95": float(np.percentile(rel, 95)),
        "heatmaps_max_err_of_peak": float(
            (np.abs(hg - hr).reshape(n, k, -1).max(-1) / np.maximum(peak, 1e-12)).mean()
        ),
        "peak_kept": float(
            (hg.reshape(n, k, -1).argmax(-1) == hr.reshape(n, k, -1).argmax(-1)).mean()
        ),
        "keypoint_moved_px": float(moved.mean()),
        "keypoint_moved_px_max": float(moved.max()),
        **loss_errors(ref, got, geometry),
    }
    for name in TOKENS:
        tr, tg = ref[name], got[name]
        cos = (tr * tg).sum(-1) / np.maximum(
            np.linalg.norm(tr, axis=-1) * np.linalg.norm(tg, axis=-1), 1e-12
        )
        out[f"{name}_rel_l2"] = float(_rel(tg, tr, (2,)).mean())
        out[f"{name}_cos"] = float(cos.mean())
        out[f"{name}_cos_p1"] = float(np.percentile(cos, 1))
    return out


def loss_errors(ref: dict, got: dict, geometry) -> dict:
    """What the heatmap terms see: the sh loss and its gradient (coords, sigmas) for a student
    predicting the ground truth with sigma 2 heatmap px, and the cs target (the teacher's value
    at the predicted joint, weighted as cs weighs it), with these targets against the fp16 ones."""
    import torch

    from distilpose.data.codecs import heatmap_values_at
    from distilpose.models.distilpose import StudentOutput
    from distilpose.training.losses import DistillationLoss

    sh = DistillationLoss({"sh": 1.0}, geometry)
    size = np.array(geometry.input_size, np.float32)
    values, grads, cs = {}, {}, {}
    for name, t in (("ref", ref), ("got", got)):
        coords = torch.tensor(t["keypoints"] / size, requires_grad=True)
        sigmas = torch.full(coords.shape, 2.0, requires_grad=True)
        student = StudentOutput(coords, torch.zeros(coords.shape[:2]), sigmas)
        heatmaps, weights = torch.from_numpy(t["heatmaps"]), torch.from_numpy(t["weights"])
        result = sh(student, {"weights": weights, "heatmaps": heatmaps})
        result["loss"].backward()
        values[name] = float(result["loss"].detach())
        grads[name] = torch.cat([coords.grad.flatten(), sigmas.grad.flatten()]).numpy()
        inside = ((coords >= 0) & (coords <= 1)).all(-1)
        cs[name] = (heatmap_values_at(heatmaps, coords.detach()) * inside * weights).numpy()
    return {
        "sh_loss_rel": abs(values["got"] - values["ref"]) / values["ref"],
        "sh_grad_rel_l2": float(
            np.linalg.norm(grads["got"] - grads["ref"]) / np.linalg.norm(grads["ref"])
        ),
        "cs_target_rel": float(np.abs(cs["got"] - cs["ref"]).sum() / np.abs(cs["ref"]).sum()),
    }


def error_set(teacher: Path, ann: Path, images: Path, root: Path, views: int) -> dict:
    """One store per mode over the same crops; bytes and, on views >= 1, field errors."""
    from distilpose.models import build_from_checkpoint

    geometry = build_from_checkpoint(teacher)[0].config.geometry
    rows, ref = {}, None
    for mode in MODES:
        info = dump(teacher, ann, images, root / mode, mode, views=views)
        got = read_views(root / mode, list(range(1, views)))
        ref = got if mode == "fp16" else ref
        rows[mode] = {**sizes(info), **field_errors(ref, got, geometry)}
        rows[mode]["samples_compared"] = len(got["key"])
    return rows


def sizes(info: dict) -> dict:
    keys = ("target_bytes_per_view", "pixel_bytes_per_view", "label_bytes_per_view")
    return {**{k: info[k] for k in keys}, "bytes_once": info["bytes_once"],
            "samples": info["samples_complete"], "dump_s": round(info["dump_s"], 1)}  # fmt: skip


def target_read_rate(path: Path, rounds: int) -> float:
    """Samples/s of `read_chunk` of the teacher targets (read, crc32c, manifest, decode), this
    process, warm page cache."""
    from store import StoreReader

    reader = StoreReader.open(path)
    chunks = reader.chunks()
    reader.read_chunk(*chunks[0], ("heatmaps", *TOKENS))
    t0 = time.perf_counter()
    for _ in range(rounds):
        for a, b in chunks:
            reader.read_chunk(a, b, ("heatmaps", *TOKENS), np.float32)
    return rounds * sum(b - a for a, b in chunks) / (time.perf_counter() - t0)


def untrained_teacher(path: Path, people: int) -> Path:
    """TokenPose-L/W48 with seeded random weights, its BatchNorm statistics recalibrated on real
    COCO crops (cumulative, no gradient): with the default statistics the untrained network gives
    every crop the same outputs (1e-7 apart), which zstd would store in nearly nothing."""
    import torch

    from distilpose.data import AugmentRecipe, load_coco_instances
    from distilpose.models import build_model, save_checkpoint
    from teacher_dump.dump import DumpCrops, collate

    torch.manual_seed(0)
    model = build_model("tokenpose_l_w48")
    cfg = model.config
    instances = load_coco_instances(COCO / "annotations" / "person_keypoints.json",
                                    COCO / "images", train=True)[:people]  # fmt: skip
    plan = [(j, inst.index, 0) for j, inst in enumerate(instances)]
    crops = DumpCrops(instances, plan, AugmentRecipe(), 0, cfg.input_size, cfg.num_keypoints)
    for bn in model.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for b in range(0, len(crops), 16):
            model(collate([crops[i] for i in range(b, min(b + 16, len(crops)))])["images"])
    save_checkpoint(path, model.eval(), meta={"role": "teacher", "model": "tokenpose_l_w48"})
    return path


def paper_set(root: Path, people: int, rounds: int) -> dict:
    """Bytes per view at the paper's sizes: untrained TokenPose-L/W48 over real COCO people."""
    from store import StoreReader

    ckpt = untrained_teacher(root / "tokenpose_l_w48_untrained.pth", people)
    ann = COCO / "annotations" / "person_keypoints.json"
    rows = {}
    for mode in MODES:
        info = dump(ckpt, ann, COCO / "images", root / mode, mode, max_instances=people)
        specs = StoreReader.open(root / mode).specs
        targets = [s for n, s in specs.items() if n.removesuffix("_scale") in OUTPUTS]
        raw = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in targets)
        rows[mode] = {**sizes(info), "target_raw_bytes_per_view": raw,
                      "read_samples_per_s": target_read_rate(root / mode, rounds)}  # fmt: skip
        shutil.rmtree(root / mode)
    return rows


def coco_estimate(paper: dict) -> dict:
    """COCO train2017, 100 views: GB = people x views x measured bytes per view, per mode, with
    the default JPEG pixels and without pixels (crops re-rendered from the 18 GB of images)."""
    out = {}
    for mode, row in paper.items():
        per_target = row["target_bytes_per_view"] + row["label_bytes_per_view"]
        per_pixels = per_target + row["pixel_bytes_per_view"]
        gb = COCO_INSTANCES * COCO_VIEWS / 1e9
        out[mode] = {
            "bytes_per_view_no_pixels": per_target,
            "bytes_per_view_jpeg": per_pixels,
            "gb_no_pixels": gb * per_target + row["bytes_once"] / 1e9,
            "gb_jpeg": gb * per_pixels + row["bytes_once"] / 1e9,
        }
    return out


def run(quick: bool = False) -> str:
    """Measure, write results/compact_bench.{json,md} and docs/store.md's table."""
    import torch

    from benchmarks.__main__ import machine_line
    from distilpose.data import make_demo_data
    from distilpose.weights import demo_teacher_path

    os.environ.setdefault("DISTILPOSE_NO_PROGRESS", "1")
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="compact_bench_"))
    try:
        teacher = demo_teacher_path()
        ann = COCO / "annotations" / "person_keypoints.json"
        demo = make_demo_data(tmp / "demo", num_train=96 if quick else 256, num_val=1, seed=0)
        record = {
            "machine": machine_line(),
            "quick": quick,
            "settings": settings_record(),
            "demo_coco": error_set(teacher, ann, COCO / "images", tmp / "coco", 2 if quick else 3),
            "demo_synthetic": error_set(
                teacher, Path(demo["train_ann"]), Path(demo["train_images"]), tmp / "syn", 2
            ),
            "paper": paper_set(tmp / "paper", 16 if quick else 64, 5 if quick else 20),
        }
        record["coco_estimate"] = coco_estimate(record["paper"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    text = report(record)
    (RESULTS / "compact_bench.md").write_text(text)
    write_docs(record)
    return text


# ---- the record as tables ------------------------------------------------------------------


def _kb(x: float) -> str:
    return f"{x / 1e3:.2f}"


def settings_record() -> dict:
    """{mode: [window, rank, [gy, gx]]}: the compact settings as the record keeps them."""
    return {m: [s.window, s.rank, list(s.grid)] for m, s in COMPACT.items()}


def settings_cell(mode: str, record: dict) -> str:
    s = record["settings"].get(mode)
    if not s:
        return f"`{mode}`"
    grid = f", outside grid {s[2][0]}x{s[2][1]}" if any(s[2]) else ""
    return f"`{mode}` (window {s[0]}, rank {s[1]}{grid})"


def error_table(rows: dict, record: dict) -> str:
    lines = [
        "| mode | targets kB/view | heatmaps rel. L2 (p95) | peak kept | keypoint moved, hm px "
        "(max) | sh grad rel. | cs target rel. | kpt tokens rel. L2 / cos | visual tokens rel. "
        "L2 / cos (p1) |",
        "|---|---:|---|---:|---|---:|---:|---|---|",
    ]
    for mode, r in rows.items():
        if mode == "fp16":
            continue
        lines.append(
            f"| {settings_cell(mode, record)} | {_kb(r['target_bytes_per_view'])} | "
            f"{r['heatmaps_rel_l2']:.3f} ({r['heatmaps_rel_l2_p95']:.3f}) | "
            f"{r['peak_kept']:.4f} | {r['keypoint_moved_px']:.3f} "
            f"({r['keypoint_moved_px_max']:.2f}) | {r['sh_grad_rel_l2']:.3f} | "
            f"{r['cs_target_rel']:.4f} | {r['keypoint_tokens_rel_l2']:.3f} / "
            f"{r['keypoint_tokens_cos']:.4f} | {r['visual_tokens_rel_l2']:.3f} / "
            f"{r['visual_tokens_cos']:.4f} ({r['visual_tokens_cos_p1']:.3f}) |"
        )
    fp16 = rows["fp16"]
    lines.append(
        f"\nReference `fp16`: {_kb(fp16['target_bytes_per_view'])} kB/view of targets; errors on "
        f"{fp16['samples_compared']} samples of views the bases were not fitted on."
    )
    return "\n".join(lines)


def paper_table(record: dict) -> str:
    lines = [
        "| mode | targets kB/view (uncompressed) | JPEG pixels kB/view | labels kB/view | once per "
        "store kB | target read, samples/s | COCO x100 views, GB: targets + labels | with JPEG "
        "pixels |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, r in record["paper"].items():
        e = record["coco_estimate"][mode]
        lines.append(
            f"| {settings_cell(mode, record)} | {_kb(r['target_bytes_per_view'])} "
            f"({_kb(r['target_raw_bytes_per_view'])}) | "
            f"{_kb(r['pixel_bytes_per_view'])} | {_kb(r['label_bytes_per_view'])} | "
            f"{r['bytes_once'] / 1e3:.0f} | {r['read_samples_per_s']:,.0f} | "
            f"{e['gb_no_pixels']:,.1f} | {e['gb_jpeg']:,.1f} |"
        )
    return "\n".join(lines)


def estimate_text(record: dict) -> str:
    e, r = record["coco_estimate"][DEFAULT_COMPACT], record["paper"][DEFAULT_COMPACT]
    over = e["gb_jpeg"] > BUDGET_GB
    return (
        f"COCO train2017, {COCO_VIEWS} views, the default compact targets (`--mode compact`: "
        f"`{DEFAULT_COMPACT}`): {COCO_INSTANCES:,} people "
        f"x {COCO_VIEWS} x ({_kb(r['target_bytes_per_view'])} kB targets + "
        f"{_kb(r['label_bytes_per_view'])} kB labels) = {e['gb_no_pixels']:,.1f} GB; with a "
        f"JPEG crop per view (`--pixels jpeg`, + {_kb(r['pixel_bytes_per_view'])} kB/view) "
        f"{e['gb_jpeg']:,.1f} GB, {'over' if over else 'within'} the {BUDGET_GB} GB goal"
        + (
            ": the pixels, not the targets, are what is left to shrink, so at this many views "
            "the default `--pixels auto` keeps one canvas per person instead (the COCO total "
            "with it: the canvas paragraph below, canvas_bench.md), and `--pixels none` "
            "re-renders the crops from the 18 GB of images."
            if over
            else "."
        )
    )


LEGEND = (
    "Peak kept: the argmax pixel equals the fp16 store's (every mode keeps the float32 teacher's "
    "argmax, tests/test_compact.py; the rest are fp16 rounding ties, as `lossy` shows). Keypoint "
    "moved: the decoded position (argmax and quarter-pixel step) in heatmap px. sh grad rel.: "
    "relative L2 change of the sh loss's gradient (coords, sigmas) for a student at the ground "
    "truth with sigma 2 px; cs target rel.: relative change of the teacher values cs reads there."
)
PAPER_NOTE = (
    "TokenPose-L/W48, untrained seeded weights (none can be downloaded here) with BatchNorm "
    "statistics recalibrated on the crops (with the default ones every crop gets the same "
    "outputs, which would compress to nearly nothing); real COCO crops, a JPEG crop per view; "
    "uncompressed = the per-view bound whatever the data. Target read: `read_chunk` of the three "
    "targets (read, checks, decode), one process, warm cache, on a shared machine."
)


def report(record: dict) -> str:
    quick = " (--quick)" if record["quick"] else ""
    return "\n".join(
        [
            f"## Compact teacher records{quick}",
            "",
            f"Machine: {record['machine']}",
            "",
            "### Errors: trained demo teacher, 86 real COCO train2017 people",
            "",
            error_table(record["demo_coco"], record),
            "",
            LEGEND,
            "",
            "### Errors: trained demo teacher, synthetic demo people",
            "",
            error_table(record["demo_synthetic"], record),
            "",
            "### Bytes per view at the paper's sizes (TokenPose-L/W48, untrained weights)",
            "",
            PAPER_NOTE,
            "",
            paper_table(record),
            "",
            estimate_text(record),
            "",
        ]
    )


def write_docs(record: dict | None = None) -> bool:
    """docs/store.md's `compact-bench` block from the record (never typed by hand)."""
    record = record or json.loads(RECORD.read_text())
    return update_readme_block("compact-bench", docs_block(record), readme=DOCS)


def docs_block(record: dict) -> str:
    """The text of docs/store.md's `compact-bench` block."""
    return "\n".join(
        [
            "Errors, trained demo teacher over 86 real COCO train2017 people (its sizes: 24x32 "
            "heatmaps, D=64, 192 visual tokens):",
            "",
            error_table(record["demo_coco"], record),
            "",
            LEGEND,
            "",
            "At the paper's sizes. " + PAPER_NOTE,
            "",
            paper_table(record),
            "",
            estimate_text(record),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--docs", action="store_true", help="only rewrite docs from the record")
    args = parser.parse_args()
    if args.docs:  # the Markdown record and the docs table again from the JSON record
        record = json.loads(RECORD.read_text())
        (RESULTS / "compact_bench.md").write_text(report(record))
        print("docs/store.md updated" if write_docs(record) else "docs/store.md has no block")
        return
    print(run(quick=args.quick))


if __name__ == "__main__":
    main()
