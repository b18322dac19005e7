"""Models: block addressing and recording, teachers, and the package's student UNet class."""

from __future__ import annotations

from automl_diff.models.blocks import BlockRecorder, block_names, get_block, layer_names, record_blocks
from automl_diff.models.loading import Teacher, load_teacher, load_unet, unet_from_config
from automl_diff.models.student import StudentUNet2DModel

__all__ = [
    "BlockRecorder",
    "StudentUNet2DModel",
    "Teacher",
    "block_names",
    "get_block",
    "layer_names",
    "load_teacher",
    "load_unet",
    "record_blocks",
    "unet_from_config",
]
