"""Inference: a trained model applied to people in images and videos.

`topdown` (person instances -> keypoints in image px, flip test, decoding per output type),
`inferencer` (`Inferencer`: detector + pose model in one call, re-exported as
`distilpose.Inferencer`), `detector` (person detectors, boxes files), `sources` (images, folders,
globs, videos, cameras), `predict` (the `predict` command's outputs), `eval_run` (the `eval`
command: a checkpoint over a COCO set, scored by `distilpose.evaluation.metrics`) and `export`
(ONNX).
Import the modules themselves; this file imports nothing.
"""
