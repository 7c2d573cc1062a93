"""Evaluation: COCO keypoint AP. `metrics` holds the pure functions (rescoring, OKS, OKS-NMS,
pycocotools), `eval_run` the `distilpose eval` command around them.

Import the modules themselves; this file imports nothing.
"""
