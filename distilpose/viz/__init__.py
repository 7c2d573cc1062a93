"""Pictures: the paper's figures, drawn from checkpoints, stores, results and run directories.

One module per picture, each with a `viz_*` function taking paths (or already loaded objects)
and an output PNG path and returning that path, and the `draw_*` functions it uses, which take
plain arrays and are what the tests check directly:

- `heatmaps`     `viz_heatmaps`: simulated heatmaps next to the teacher's cached ones (paper
                 Fig. 5 / Fig. B);
- `confidence`   `viz_confidence`: a crop with each joint's name and score, green when correct
                 (Fig. 6);
- `attention`    `viz_attention`: one keypoint token's attention over the visual tokens (Fig. 3b);
- `predictions`  `viz_predictions`: every person's skeleton on a whole image from COCO results;
- `curves`       `viz_curves`: loss terms and AP per evaluation from a run's `metrics.csv` (its
                 loss plotter also draws the trainer's loss_curves.png).

Shared by them: `skeleton` (the one skeleton drawer and its colour rule, also used by
`distilpose predict`'s overlays) and `common` (figures, PNG writing, models, crops).
"""

from distilpose.viz.attention import (
    ATTENTION_PANEL_SIZE,
    attention_modules,
    attention_weights,
    keypoint_attention,
    viz_attention,
)
from distilpose.viz.common import (
    DPI,
    crop_whole_image,
    display_size,
    figure_pixels,
    load_instance,
    render_instance,
)
from distilpose.viz.confidence import (
    CONFIDENCE_SIZE,
    CORRECT_COLOR,
    UNKNOWN_COLOR,
    WRONG_COLOR,
    draw_confidence,
    oks_correct,
    viz_confidence,
)
from distilpose.viz.curves import (
    CURVES_SIZE,
    draw_curves,
    draw_loss_curves,
    metrics_columns,
    plot_losses,
    read_metrics,
    viz_curves,
)
from distilpose.viz.heatmaps import (
    HEATMAP_PAIR_SIZE,
    HEATMAP_PAIRS_PER_ROW,
    HEATMAP_TITLE_HEIGHT,
    draw_heatmap_pairs,
    heatmap_figure_size,
    viz_heatmaps,
)
from distilpose.viz.predictions import (
    PERSON_COLORS_BGR,
    PREDICTIONS_MAX_SIDE,
    draw_skeletons,
    viz_predictions,
)
from distilpose.viz.skeleton import (
    LEFT_COLOR,
    MIDDLE_COLOR,
    RIGHT_COLOR,
    draw_pose,
    plot_skeleton,
)

__all__ = [
    "ATTENTION_PANEL_SIZE",
    "CONFIDENCE_SIZE",
    "CORRECT_COLOR",
    "CURVES_SIZE",
    "DPI",
    "HEATMAP_PAIRS_PER_ROW",
    "HEATMAP_PAIR_SIZE",
    "HEATMAP_TITLE_HEIGHT",
    "LEFT_COLOR",
    "MIDDLE_COLOR",
    "PERSON_COLORS_BGR",
    "PREDICTIONS_MAX_SIDE",
    "RIGHT_COLOR",
    "UNKNOWN_COLOR",
    "WRONG_COLOR",
    "attention_modules",
    "attention_weights",
    "crop_whole_image",
    "display_size",
    "draw_confidence",
    "draw_curves",
    "draw_heatmap_pairs",
    "draw_loss_curves",
    "draw_pose",
    "draw_skeletons",
    "figure_pixels",
    "heatmap_figure_size",
    "keypoint_attention",
    "load_instance",
    "metrics_columns",
    "oks_correct",
    "plot_losses",
    "plot_skeleton",
    "read_metrics",
    "render_instance",
    "viz_attention",
    "viz_confidence",
    "viz_curves",
    "viz_heatmaps",
    "viz_predictions",
]
