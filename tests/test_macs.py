from __future__ import annotations

import pytest
from torch import nn

from automl_diff.metrics.macs import count_macs

DDPM_CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
)


def test_ddpm_cifar10_matches_published_counts():
    from diffusers import UNet2DModel

    report = count_macs(UNet2DModel(**DDPM_CIFAR10))
    assert report.params == pytest.approx(35.75e6, rel=0.01)
    assert report.macs_no_attention == pytest.approx(6.07e9, rel=0.01)
    # attention matmuls (QK^T and AV) are counted in `macs` only: 2 layers in down.1 and 3 in up.2
    # at 16x16 (256 tokens of 256 channels), one in mid at 4x4
    attn_16 = 2 * 256 * 256 * 256
    attn_4 = 2 * 16 * 16 * 256
    assert report.macs - report.macs_no_attention == 5 * attn_16 + attn_4


@pytest.mark.slow
def test_sd15_unet_matches_published_counts():
    from diffusers import UNet2DConditionModel

    report = count_macs(UNet2DConditionModel(cross_attention_dim=768, sample_size=64), text_length=77)
    assert report.params == pytest.approx(859.5e6, rel=0.01)
    assert report.macs_no_attention == pytest.approx(339.0e9, rel=0.01)


def test_blocks_sum_to_total_and_attention_is_counted(tiny_unet):
    report = count_macs(tiny_unet)
    assert sum(b.macs for b in report.blocks) == report.macs
    assert sum(b.params for b in report.blocks) == report.params == sum(p.numel() for p in tiny_unet.parameters())
    assert [b.name for b in report.blocks] == ["down.0", "down.1", "mid", "up.0", "up.1", "other"]
    # "other" = conv_in + conv_out + time embedding (+ norm_out), computed independently here
    c = tiny_unet.config
    conv_in = 16 * 16 * 8 * 1 * 9
    conv_out = 16 * 16 * 1 * 8 * 9
    time_embedding = 8 * 32 + 32 * 32  # two linears: 8 -> 4*8 -> 4*8
    norm_out = 16 * 16 * 8 * 5  # fvcore's estimate for an affine GroupNorm: 5 per element
    assert c.block_out_channels[0] == 8
    assert report.block("other").macs == conv_in + conv_out + time_embedding + norm_out
    # down.1 has attention over 8x8 = 64 tokens of 16 channels: QK^T + AV = 2 * 64 * 64 * 16
    down1 = report.block("down.1")
    assert down1.macs - down1.macs_no_attention == 2 * 64 * 64 * 16
    assert report.block("down.0").macs == report.block("down.0").macs_no_attention


def test_conv_macs_are_exact():
    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, padding=1)
            self.config = type("C", (), {"sample_size": 8, "in_channels": 3})()
            self.down_blocks, self.up_blocks, self.mid_block = nn.ModuleList(), nn.ModuleList(), None

        def forward(self, x, t, return_dict=False):
            return (self.conv(x),)

    report = count_macs(One())
    assert report.macs == 8 * 8 * 5 * 3 * 3 * 3


def test_macs_grow_with_width(tiny_unet):
    from diffusers import UNet2DModel

    from tests.conftest import TINY_UNET

    wide = UNet2DModel(**{**TINY_UNET, "block_out_channels": [16, 32]})
    assert count_macs(wide).macs > 3 * count_macs(tiny_unet).macs


def test_conditional_unet_counts_cross_attention(tiny_cond_unet):
    short = count_macs(tiny_cond_unet, text_length=4)
    long = count_macs(tiny_cond_unet, text_length=40)
    assert long.macs > short.macs  # the cross-attention matmuls and k/v projections scale with text length
    assert long.params == short.params
