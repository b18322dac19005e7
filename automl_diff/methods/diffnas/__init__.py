"""DiffNAS: block-wise neural architecture search with distillation.

* :mod:`~automl_diff.methods.diffnas.choice`: a block candidate and what every supernet shares.
* :mod:`~automl_diff.methods.diffnas.supernet`: per-block supernets of UNet blocks with
  weight-shared subnets, cutting subnets out and assembling students.
* :mod:`~automl_diff.methods.diffnas.transformer`: the supernets of a DiT's transformer blocks
  (skipped, fewer heads, a narrower MLP).
* :mod:`~automl_diff.methods.diffnas.search`: block-wise supernet training, the per-block (local)
  and joint (global) searches as Optuna studies.
* :mod:`~automl_diff.methods.diffnas.retrain`: retraining with the dynamic joint loss.
* :mod:`~automl_diff.methods.diffnas.method`: the study method (``method: diffnas``).
"""

from automl_diff.config.options import DiffNASOptions
from automl_diff.methods.diffnas.choice import BlockChoice, Supernet
from automl_diff.methods.diffnas.method import DiffNAS
from automl_diff.methods.diffnas.retrain import JointLoss, JointWeight
from automl_diff.methods.diffnas.search import choose_global, choose_local, global_search, local_search, train_supernets
from automl_diff.methods.diffnas.supernet import BlockSupernet, assemble_student, build_supernets
from automl_diff.methods.diffnas.transformer import TransformerBlockSupernet

__all__ = [
    "BlockChoice",
    "BlockSupernet",
    "DiffNAS",
    "DiffNASOptions",
    "JointLoss",
    "JointWeight",
    "Supernet",
    "TransformerBlockSupernet",
    "assemble_student",
    "build_supernets",
    "choose_global",
    "choose_local",
    "global_search",
    "local_search",
    "train_supernets",
]
