from __future__ import annotations

import pytest
import torch

from automl_diff.errors import UserError
from automl_diff.models.blocks import block_names, get_block, layer_names, module_path_to_name, name_to_module_path, record_blocks


def test_block_names_follow_execution_order(tiny_unet, tiny_cond_unet):
    assert block_names(tiny_unet) == ["down.0", "down.1", "mid", "up.0", "up.1"]
    assert block_names(tiny_cond_unet) == ["down.0", "down.1", "mid", "up.0", "up.1"]


def test_names_map_to_diffusers_modules(tiny_unet):
    assert get_block(tiny_unet, "down.1") is tiny_unet.down_blocks[1]
    assert get_block(tiny_unet, "mid") is tiny_unet.mid_block
    assert get_block(tiny_unet, "down.1.attentions.0") is tiny_unet.down_blocks[1].attentions[0]
    assert layer_names(tiny_unet, "down.1") == ["down.1.resnets.0", "down.1.attentions.0"]
    assert name_to_module_path("up.0.resnets.1") == "up_blocks.0.resnets.1"
    assert module_path_to_name("down_blocks.1.resnets.0") == "down.1.resnets.0"
    assert module_path_to_name("conv_in") is None


@pytest.mark.parametrize("name", ["down.7", "middle", "up.0.resnets.9", "mid.foo"])
def test_unknown_block_is_a_user_error(tiny_unet, name):
    with pytest.raises(UserError, match="unknown block"):
        get_block(tiny_unet, name)


def test_recording_captures_block_io_and_removes_hooks(tiny_unet):
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    reference = tiny_unet(x, t).sample
    with record_blocks(tiny_unet, ["down.1", "mid", "up.1.resnets.0"]) as rec:
        out = tiny_unet(x, t).sample
    torch.testing.assert_close(out, reference)
    assert len(rec["mid"].outputs) == 1
    assert rec["mid"].outputs[0].shape == (2, 16, 8, 8)
    assert rec["mid"].args[0][0].shape == (2, 16, 8, 8)  # mid input = last down output
    hidden, skips = rec["down.1"].outputs[0]
    assert hidden.shape == (2, 16, 8, 8) and len(skips) == 1
    assert rec["up.1.resnets.0"].outputs[0].shape[1] == 8
    # hooks are gone: a second forward records nothing more
    tiny_unet(x, t)
    assert len(rec["mid"].outputs) == 1


def test_recording_conditional_unet(tiny_cond_unet):
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 5, 12)
    with record_blocks(tiny_cond_unet) as rec:
        tiny_cond_unet(x, t, encoder_hidden_states=ctx)
    assert set(r.name for r in rec) == {"down.0", "down.1", "mid", "up.0", "up.1"}
    # the cross-attention block received the text context
    assert rec["down.0"].kwargs[0]["encoder_hidden_states"].shape == (1, 5, 12)
