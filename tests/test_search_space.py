from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
import yaml

from automl_diff.config import load_search_space
from automl_diff.errors import UserError
from automl_diff.models.loading import unet_from_config
from tests.conftest import REPO, TINY_UNET


def _space(tmp_path: Path, data) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_every_choice_builds_a_model_with_the_teacher_io(tiny_space):
    space = load_search_space(tiny_space)
    space.validate_for(TINY_UNET)
    assert space.parameters() == {
        "down.0.channels": (4, 8),
        "down.1.channels": (8, 16),
        "down.1.layers": (1, 2),
        "down.1.attention": (True, False),
    }
    assert space.size() == 16
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([1, 999])
    for c0 in (4, 8):
        for c1 in (8, 16):
            for layers in (1, 2):
                for attention in (True, False):
                    params = {"down.0.channels": c0, "down.1.channels": c1, "down.1.layers": layers, "down.1.attention": attention}
                    config = space.to_config(params, TINY_UNET)
                    model = unet_from_config(config)
                    assert model(x, t).sample.shape == x.shape
                    assert [len(b.resnets) for b in model.down_blocks] == [1, layers]
                    assert model.config.block_out_channels == (c0, c1) or list(model.config.block_out_channels) == [c0, c1]
                    assert (config["down_block_types"][1] == "AttnDownBlock2D") is attention
                    assert (config["up_block_types"][0] == "AttnUpBlock2D") is attention  # up.0 mirrors down.1
                    expected = "UNet2DModel" if layers == 1 else "StudentUNet2DModel"
                    assert config["_class_name"] == expected and type(model).__name__ == expected


def test_suggest_uses_dotted_optuna_parameters(tiny_space):
    space = load_search_space(tiny_space)
    params = space.suggest(
        optuna.trial.FixedTrial({"down.0.channels": 8, "down.1.channels": 16, "down.1.layers": 2, "down.1.attention": False})
    )
    assert params["down.1.layers"] == 2


def test_shipped_search_spaces_are_valid():
    from automl_diff.zoo.digits import TEACHER_CONFIG

    space = load_search_space(REPO / "search_spaces" / "digits_dkdm.yaml")
    space.validate_for(TEACHER_CONFIG)
    assert space.size() >= 16


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("blocks: [unclosed", r"space\.yaml: invalid YAML at line 1"),
        ("- a\n- b\n", r"space\.yaml: expected a mapping"),
        ({"family": "unet2d"}, r"space\.yaml: blocks: required key is missing"),
        ({"blocks": {"down.0": {"channels": "wide"}}}, r"space\.yaml: blocks\.down\.0\.channels\[0\]: expected an integer \(got 'wide'\)"),
        ({"blocks": {"down.0": {"chanels": [8]}}}, r"space\.yaml: blocks\.down\.0\.chanels: unknown key"),
        ({"blocks": {"down.0": {"channels": [8, 8]}}}, r"blocks\.down\.0\.channels: repeats a value"),
        ({"blocks": {"down.0": {"layers": [0]}}}, r"blocks\.down\.0\.layers\[0\]: must be positive"),
        ({"blocks": {"down.0": {"attention": ["yes"]}}}, r"blocks\.down\.0\.attention\[0\]: expected true/false"),
        ({"family": "transformer", "blocks": {"mid": {}}}, r"family: must be one of unet2d"),
    ],
)
def test_structural_errors_name_file_and_key(tmp_path, data, message):
    with pytest.raises(UserError, match=message):
        load_search_space(_space(tmp_path, data))


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ({"down.5": {"channels": [8]}}, r"blocks\.down\.5: unknown block; the teacher has blocks down\.0, down\.1, mid, up\.0, up\.1"),
        ({"down.0": {"channels": [6]}}, r"blocks\.down\.0\.channels: 6 is not divisible by norm_num_groups=4"),
        ({"up.0": {"channels": [8]}}, r"blocks\.up\.0: up blocks mirror down\.1"),
        ({"mid": {"layers": [2]}}, r"blocks\.mid: mid keeps the last level's channels"),
    ],
)
def test_errors_against_the_teacher_name_file_and_key(tmp_path, blocks, message):
    space = load_search_space(_space(tmp_path, {"blocks": blocks}))
    with pytest.raises(UserError, match=message):
        space.validate_for(TINY_UNET)


def test_missing_file():
    with pytest.raises(UserError, match="search space 'nope.yaml' does not exist"):
        load_search_space("nope.yaml")


def test_channels_must_split_into_attention_heads(tmp_path):
    space = load_search_space(_space(tmp_path, {"blocks": {"down.1": {"channels": [8, 12], "attention": [True, False]}}}))
    with pytest.raises(UserError, match=r"blocks\.down\.1\.channels: 12 is not divisible by attention_head_dim=8"):
        space.validate_for({**TINY_UNET, "attention_head_dim": 8})
