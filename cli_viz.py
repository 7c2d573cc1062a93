"""`distilpose viz ...`: the pictures (PNG), one command each, each a call into distilpose.viz."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli_support import ConfigOpt
from distilpose.geometry import PAPER

viz_app = typer.Typer(
    help="Pictures (PNG) of heatmaps, confidences, attention, predictions, curves."
)


@viz_app.command("heatmaps")
def viz_heatmaps(
    checkpoint: Annotated[Path, typer.Option(help="Student checkpoint.", exists=True)],
    store: Annotated[str, typer.Option(help="Teacher store.")],
    out: Annotated[Path, typer.Option(help="Output PNG.")] = Path("heatmaps.png"),
    sample: Annotated[int, typer.Option(help="Store sample (slot) to show.")] = 0,
    config: ConfigOpt = None,
) -> None:
    """Simulated heatmaps beside the teacher's, with sigma_x, sigma_y (paper Fig. 5)."""
    from distilpose.viz import viz_heatmaps as draw
    from store.reader import StoreReader

    reader = StoreReader.open(store)
    typer.echo(draw(checkpoint, reader, out, sample=sample))


@viz_app.command("confidence")
def viz_confidence(
    checkpoint: Annotated[Path, typer.Option(help="Student checkpoint.", exists=True)],
    ann: Annotated[Path, typer.Option(help="Annotation file.", exists=True)],
    images: Annotated[Path, typer.Option(help="Image folder.", exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option(help="Output PNG.")] = Path("confidence.png"),
    instance: Annotated[int, typer.Option(help="Person index in the annotation file.")] = 0,
    config: ConfigOpt = None,
) -> None:
    """Joints labelled with their scores, green when correct, red when not (paper Fig. 6)."""
    from distilpose.viz import viz_confidence as draw

    typer.echo(draw(checkpoint, ann, images, out, instance=instance))


@viz_app.command("attention")
def viz_attention(
    checkpoint: Annotated[
        list[Path],
        typer.Option(help="Teacher or student checkpoint; repeat for one panel each.", exists=True),
    ],
    ann: Annotated[Path, typer.Option(help="Annotation file.", exists=True)],
    images: Annotated[Path, typer.Option(help="Image folder.", exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option(help="Output PNG.")] = Path("attention.png"),
    instance: Annotated[int, typer.Option(help="Person index in the annotation file.")] = 0,
    keypoint: Annotated[
        str, typer.Option(help="Keypoint token to show (COCO name).")
    ] = "right_ankle",
    layer: Annotated[int, typer.Option(help="Encoder layer (negative counts from the end).")] = -1,
    config: ConfigOpt = None,
) -> None:
    """Attention of one keypoint token over the visual tokens (paper Fig. 3b)."""
    from distilpose.viz import render_instance
    from distilpose.viz import viz_attention as draw

    # rendered larger than any model input (same aspect) so the picture is sharp
    _, crop = render_instance(ann, images, instance, tuple(3 * v // 2 for v in PAPER.input_size))
    typer.echo(draw(checkpoint, crop.image, out, keypoint=keypoint, layer=layer))


@viz_app.command("predictions")
def viz_predictions(
    results: Annotated[
        Path, typer.Option(help="COCO results JSON from eval or predict.", exists=True)
    ],
    image: Annotated[Path, typer.Option(help="The image.", exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option(help="Output PNG.")] = Path("predictions.png"),
    image_id: Annotated[
        int | None, typer.Option(help="Image id in the results (else by file).")
    ] = None,
    score_thr: Annotated[float, typer.Option(help="Hide joints scoring below this.")] = 0.3,
    config: ConfigOpt = None,
) -> None:
    """Every person's skeleton on a whole image."""
    from distilpose.viz import viz_predictions as draw

    typer.echo(draw(results, image, out, image_id=image_id, score_thr=score_thr))


@viz_app.command("curves")
def viz_curves(
    run_dir: Annotated[
        Path, typer.Argument(help="Run directory with metrics.csv.", exists=True, file_okay=False)
    ],
    out: Annotated[Path, typer.Option(help="Output PNG.")] = Path("curves.png"),
    config: ConfigOpt = None,
) -> None:
    """Training curves per loss term and AP per evaluation."""
    from distilpose.viz import viz_curves as draw

    typer.echo(draw(run_dir, out))
