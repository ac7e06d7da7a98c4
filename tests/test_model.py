"""The reference DiT against the official golden outputs and the official parameter counts."""
import numpy as np
import pytest
import torch

from conftest import max_rel_err
from ditrt.exporter.model import (DIT_CONFIGS, DiT, DiTConfig, count_parameters, macs_per_forward, named_config,
                                  set_precision)
from helpers import build_model


def _forward(model, x, t, y):
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).float().numpy()


def test_fp32_forward_matches_official(tiny_checkpoint, golden):
    out = _forward(build_model(tiny_checkpoint), golden["forward_x"], golden["forward_t"], golden["forward_y"])
    assert max_rel_err(out, golden["forward_out"]) <= 1e-5


def test_fp32_cfg_forward_matches_official(tiny_checkpoint, golden):
    model = build_model(tiny_checkpoint)
    with torch.no_grad():
        out = model.forward_with_cfg(torch.from_numpy(golden["cfg_x"]), torch.from_numpy(golden["cfg_t"]),
                                     torch.from_numpy(golden["cfg_y"]), 4.0).numpy()
    assert max_rel_err(out, golden["cfg_out"]) <= 1e-5


def test_standard_guidance_guides_all_latent_channels(tiny_checkpoint, golden):
    model = build_model(tiny_checkpoint)
    x, t, y = (torch.from_numpy(golden[k]) for k in ("cfg_x", "cfg_t", "cfg_y"))
    with torch.no_grad():
        official = model.forward_with_cfg(x, t, y, 4.0, guided_channels=3)
        standard = model.forward_with_cfg(x, t, y, 4.0, guided_channels=4)
        raw = model(torch.cat([x[:2], x[:2]]), t, y)
    cond, uncond = raw[:2], raw[2:]
    torch.testing.assert_close(standard[:2, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]))
    torch.testing.assert_close(official[:2, 3], cond[:, 3])  # the official quirk: channel 3 unguided
    torch.testing.assert_close(standard[:2, 4:], cond[:, 4:])  # variance stays conditional


def test_fp16_model_error_is_measured_and_small(tiny_checkpoint, golden):
    model = set_precision(build_model(tiny_checkpoint), "fp16")
    # The sinusoid stays float32, and its frequencies are not rounded through fp16 on the way
    # (a rounded table costs ~3e-2 at t = 999 on DiT-XL/2).
    assert model.t_embedder.freqs.dtype == torch.float32
    assert torch.equal(model.t_embedder.freqs, build_model(tiny_checkpoint).t_embedder.freqs)
    assert model.blocks[0].mlp.fc1.weight.dtype == torch.float16
    err = max_rel_err(_forward(model, golden["forward_x"], golden["forward_t"], golden["forward_y"]),
                      golden["forward_out"])
    print(f"fp16 model vs official fp32 forward: max rel err {err:.2e}")
    assert err <= 2e-3  # measured 9.9e-4; fp16 unit roundoff is 4.9e-4


def test_fp32_blocks_stay_float32(tiny_checkpoint, golden):
    model = set_precision(build_model(tiny_checkpoint), "fp16", fp32_blocks=(1,))
    assert model.blocks[1].attn.qkv.weight.dtype == torch.float32
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float16
    out = _forward(model, golden["forward_x"], golden["forward_t"], golden["forward_y"])
    assert out.dtype == np.float32 and max_rel_err(out, golden["forward_out"]) <= 1e-2
    with pytest.raises(ValueError, match="out of range"):
        set_precision(build_model(tiny_checkpoint), "fp16", fp32_blocks=(2,))


def _official_param_count(cfg: DiTConfig) -> int:
    """From the official state-dict shapes (docs/official-semantics.md), written out independently."""
    D, p, C, K = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.num_classes
    T, M, out = (cfg.input_size // p) ** 2, int(D * cfg.mlp_ratio), cfg.out_channels
    block = (3 * D * D + 3 * D) + (D * D + D) + (M * D + M) + (D * M + D) + (6 * D * D + 6 * D)
    return (D * C * p * p + D) + T * D + (D * 256 + D) + (D * D + D) + (K + 1) * D + cfg.depth * block \
        + (p * p * out * D + p * p * out) + (2 * D * D + 2 * D)


@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_every_named_config_has_the_official_parameter_count(name):
    cfg = named_config(name, 256)
    with torch.device("meta"):
        model = DiT(cfg)
    assert count_parameters(model) == _official_param_count(cfg)


def test_dit_xl2_matches_the_published_numbers():
    cfg = named_config("DiT-XL/2", 256)
    with torch.device("meta"):
        model = DiT(cfg)
    assert count_parameters(model) == 675_129_632
    sd = model.state_dict()
    assert len(sd) == 292 and "pos_embed" in sd and "t_embedder.freqs" not in sd
    assert tuple(sd["blocks.27.adaLN_modulation.1.weight"].shape) == (6912, 1152)
    assert tuple(sd["y_embedder.embedding_table.weight"].shape) == (1001, 1152)
    assert round(macs_per_forward(cfg) / 1e9, 1) == 118.6
    assert round(macs_per_forward(named_config("DiT-XL/2", 512)) / 1e9, 1) == 524.5


def test_any_latent_size_class_count_and_learn_sigma_off():
    cfg = DiTConfig(input_size=12, patch_size=4, hidden_size=48, depth=1, num_heads=3, num_classes=7, learn_sigma=False)
    model = DiT(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 4, 12, 12), torch.tensor([3.0, 999.0]), torch.tensor([0, 7]))
    assert out.shape == (2, 4, 12, 12)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="unknown DiT config 'DiT-M/2'"):
        named_config("DiT-M/2")
    with pytest.raises(ValueError, match="not a multiple of 8"):
        named_config("DiT-S/2", 250)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DiT(DiTConfig(hidden_size=64, num_heads=5, depth=1))
