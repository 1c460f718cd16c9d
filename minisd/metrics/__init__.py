"""The MS-COCO protocol's metrics: FID (as pytorch-fid) and Inception Score (as torch-fidelity) on the TF-FID
Inception-v3, and the CLIP score (as BK-SDM computes it with open_clip) in minisd.metrics.clip_score.

The weights load with `minisd.metrics.inception_weights.load_inception` and
`minisd.metrics.open_clip_weights.load_clip` (through minisd.checkpoints' rule tables).
"""

from minisd.metrics.fid import (
    FolderFeatures,
    feature_stats,
    folder_features,
    folder_stats,
    frechet_distance,
    image_files,
    load_stats,
    save_stats,
)
from minisd.metrics.inception import InceptionV3
from minisd.metrics.inception_score import inception_score

__all__ = ["FolderFeatures", "InceptionV3", "feature_stats", "folder_features", "folder_stats",
           "frechet_distance", "image_files", "inception_score", "load_stats", "save_stats"]
