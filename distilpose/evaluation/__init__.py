"""Evaluation: COCO keypoint AP as pure functions (`metrics`: rescoring, OKS, OKS-NMS,
pycocotools), below inference: it imports only `distilpose.data`. The `distilpose eval` run that
applies a model and scores it is `distilpose.inference.eval_run`.

Import the modules themselves; this file imports nothing.
"""
