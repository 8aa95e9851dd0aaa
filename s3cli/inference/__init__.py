"""Streaming video object segmentation engine (no network code, no I/O).

``Tracker`` drives any network that follows ``VOSNetworkProtocol`` one frame at a time;
``InferenceConfig`` holds its options.
"""

from s3cli.inference.config import InferenceConfig, LongTermConfig
from s3cli.inference.engine import Tracker, TrackerState, VOSNetworkProtocol
from s3cli.inference.objects import probabilities_to_binary_masks, probabilities_to_index_mask

__all__ = [
    "InferenceConfig",
    "LongTermConfig",
    "Tracker",
    "TrackerState",
    "VOSNetworkProtocol",
    "probabilities_to_binary_masks",
    "probabilities_to_index_mask",
]
