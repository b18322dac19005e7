"""Shared fixtures: tiny UNets (channels 8/16 at 16x16), a tiny teacher folder, tiny study configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]

TINY_UNET = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 4,
}

TINY_COND_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [8, 16],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 4,
    "cross_attention_dim": 12,
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """FID reference statistics go to a per-session temporary cache."""
    monkeypatch.setenv("AUTOML_DIFF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(**TINY_UNET).eval()


@pytest.fixture
def tiny_cond_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_COND_UNET).eval()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers pipeline folder (unet + DDPM scheduler) with a tiny random-weight teacher."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher")
    DDPMPipeline(unet=UNet2DModel(**TINY_UNET), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_space(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "family": "unet2d",
                "blocks": {
                    "down.0": {"channels": [4, 8]},
                    "down.1": {"channels": [8, 16], "layers": [1, 2], "attention": [True, False]},
                },
            }
        )
    )
    return path


def write_study(tmp_path: Path, teacher: Path, space: Path, **overrides) -> Path:
    """A tiny DKDM study config (seconds per trial); keys in ``overrides`` replace the defaults
    (a None value removes the key)."""
    config = {
        "name": "tiny",
        "method": "dkdm",
        "teacher": str(teacher),
        "search_space": str(space),
        "objectives": [{"name": "macs", "direction": "minimize"}, {"name": "fid", "direction": "minimize"}],
        "sampler": {"name": "random", "seed": 0},
        "n_trials": 2,
        "budgets": {
            "train_iterations": 4,
            "batch_size": 8,
            "fid_samples": 24,
            "sampling_steps": 2,
            "latency_repeats": 1,
            "latency_batch_size": 2,
        },
        "fid": {"dataset": "digits", "features": "digits"},
        "storage": f"sqlite:///{tmp_path / 'study.db'}",
        "output_dir": str(tmp_path / "runs"),
        "device": "cpu",
        "method_options": {"pool_size": 16, "pool_steps": 5},
    }
    for key, value in overrides.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def study_factory(tmp_path: Path, tiny_teacher_dir: Path, tiny_space: Path):
    def make(**overrides) -> Path:
        return write_study(tmp_path, tiny_teacher_dir, tiny_space, **overrides)

    return make
