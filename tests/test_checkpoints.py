"""Checkpoint formats, conversions and every bad-input message."""
import argparse
import json
import subprocess
import sys

import pytest
import torch

from conftest import TINY_CHECKPOINT
from ditrt.exporter.checkpoints import CheckpointError, diffusers_to_official, load_checkpoint
from helpers import official_to_diffusers, save_diffusers


@pytest.fixture(scope="module")
def state_dict(tiny_checkpoint):
    return tiny_checkpoint.state_dict


def test_official_checkpoint_infers_config(tiny_checkpoint, golden_meta):
    assert tiny_checkpoint.format == "official"
    assert tiny_checkpoint.config.to_dict() == {**golden_meta["model"], "mlp_ratio": 4.0}
    assert len(tiny_checkpoint.sha256) == 64


def test_official_diffusers_official_round_trip_is_exact(state_dict):
    diffusers = official_to_diffusers(state_dict)
    assert "transformer_blocks.1.attn1.to_k.weight" in diffusers and "proj_out_2.bias" in diffusers
    back = diffusers_to_official(diffusers)
    assert set(back) == set(state_dict)
    for key, tensor in state_dict.items():
        assert torch.equal(back[key], tensor), key


def test_diffusers_safetensors_file_loads_with_its_config(tmp_path, state_dict, tiny_checkpoint):
    weights = save_diffusers(state_dict, tiny_checkpoint.config, tmp_path)
    ckpt = load_checkpoint(weights)  # heads come from config.json
    assert ckpt.format == "diffusers" and ckpt.config == tiny_checkpoint.config
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in state_dict.items())


def test_diffusers_bin_without_pos_embed_recomputes_it(tmp_path, state_dict, tiny_checkpoint):
    diffusers = official_to_diffusers(state_dict)
    del diffusers["pos_embed.pos_embed"]
    save_diffusers(state_dict, tiny_checkpoint.config, tmp_path)  # for config.json
    torch.save(diffusers, tmp_path / "diffusion_pytorch_model.bin")
    ckpt = load_checkpoint(tmp_path / "diffusion_pytorch_model.bin")
    assert any("recomputed" in n for n in ckpt.notes)
    # The golden pos_embed is the sin-cos table, so the recomputed one matches it.
    torch.testing.assert_close(ckpt.state_dict["pos_embed"], state_dict["pos_embed"], rtol=0, atol=1e-7)


def test_training_checkpoint_loads_its_ema(tmp_path, state_dict):
    noisy = {k: v + 1 for k, v in state_dict.items()}
    path = tmp_path / "0400000.pt"
    torch.save({"model": noisy, "ema": state_dict, "opt": {"state": {}}, "args": argparse.Namespace(model="DiT-S/2")}, path)
    ckpt = load_checkpoint(path, num_heads=4)
    assert ckpt.format == "training-ema" and "ema" in ckpt.notes[0]
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in state_dict.items())


def test_half_precision_weights_are_converted(tmp_path, state_dict):
    path = tmp_path / "half.pt"
    torch.save({k: v.half() for k, v in state_dict.items()}, path)
    ckpt = load_checkpoint(path, num_heads=4)
    assert ckpt.state_dict["pos_embed"].dtype == torch.float32 and "float16" in ckpt.notes[0]


# ---- bad input: each case names its problem --------------------------------------------------------

def _error(path, **overrides) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **overrides)
    return str(info.value)


def test_missing_file(tmp_path):
    assert "checkpoint not found" in _error(tmp_path / "nope.pt")


def test_directory_is_not_a_checkpoint(tmp_path):
    assert "not a file" in _error(tmp_path)


def test_garbage_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"definitely not a checkpoint")
    assert "unreadable checkpoint" in _error(tmp_path / "junk.pt")


def test_truncated_checkpoint(tmp_path):
    data = TINY_CHECKPOINT.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert "unreadable checkpoint" in _error(tmp_path / "cut.pt")


class Payload:  # an arbitrary class: weights_only must refuse it
    pass


def test_pickled_objects_are_refused_not_executed(tmp_path):
    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    msg = _error(tmp_path / "evil.pt")
    assert "weights_only" in msg and "Payload" in msg


def test_not_a_dit(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    msg = _error(tmp_path / "other.pt")
    assert "does not look like a DiT checkpoint" in msg and "encoder.weight" in msg


def test_missing_unexpected_and_mismatched_keys_are_listed(tmp_path, state_dict):
    bad = dict(state_dict)
    del bad["blocks.1.mlp.fc1.bias"]
    bad["blocks.0.extra.weight"] = torch.zeros(3)
    bad["blocks.0.attn.proj.weight"] = torch.zeros(64, 32)
    torch.save(bad, tmp_path / "bad.pt")
    msg = _error(tmp_path / "bad.pt", num_heads=4)
    assert "missing keys (1): blocks.1.mlp.fc1.bias" in msg
    assert "unexpected keys (1): blocks.0.extra.weight" in msg
    assert "blocks.0.attn.proj.weight: file (64, 32) vs model (64, 64)" in msg


def test_heads_not_derivable_asks_for_an_override():
    assert "cannot infer num_heads" in _error(TINY_CHECKPOINT)


def test_unknown_override():
    assert "unknown config override(s): heads" in _error(TINY_CHECKPOINT, heads=4)


def test_training_checkpoint_without_ema(tmp_path, state_dict):
    torch.save({"model": state_dict, "opt": {}}, tmp_path / "train.pt")
    assert "without 'ema'" in _error(tmp_path / "train.pt")


def test_non_tensor_entries(tmp_path, state_dict):
    torch.save({**state_dict, "step": 5}, tmp_path / "mixed.pt")
    assert "non-tensor entries step" in _error(tmp_path / "mixed.pt")


def test_diffusers_embedder_copies_that_differ(tmp_path, state_dict):
    d = official_to_diffusers(state_dict)
    d["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"] += 1
    torch.save(d, tmp_path / "d.bin")
    assert "differs from block 0's copy" in _error(tmp_path / "d.bin", num_heads=4)


def test_diffusers_keys_without_counterpart(tmp_path, state_dict):
    d = official_to_diffusers(state_dict)
    d["transformer_blocks.0.norm2.weight"] = torch.ones(64)
    torch.save(d, tmp_path / "d.bin")
    assert "no official counterpart: transformer_blocks.0.norm2.weight" in _error(tmp_path / "d.bin", num_heads=4)


def test_diffusers_missing_key(tmp_path, state_dict):
    d = official_to_diffusers(state_dict)
    del d["transformer_blocks.1.attn1.to_v.bias"]
    torch.save(d, tmp_path / "d.bin")
    assert "missing key transformer_blocks.1.attn1.to_v.bias" in _error(tmp_path / "d.bin", num_heads=4)


def test_other_diffusers_transformers_are_not_a_dit(tmp_path):
    torch.save({"pos_embed.proj.weight": torch.zeros(8, 4, 2, 2), "proj_out.weight": torch.zeros(4, 8),
                "transformer_blocks.0.attn1.to_q.weight": torch.zeros(8, 8)}, tmp_path / "pixart.bin")
    assert "not a class-conditional DiT" in _error(tmp_path / "pixart.bin")


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "w.safetensors").write_bytes((20).to_bytes(8, "little") + b'{"a": broken json}')
    assert "unreadable safetensors" in _error(tmp_path / "w.safetensors")


# ---- CLI ---------------------------------------------------------------------------------------------

def _ditrt(*args):
    return subprocess.run([sys.executable, "-m", "ditrt.cli", *map(str, args)], capture_output=True, text=True)


def test_inspect_prints_config_params_and_gmacs():
    r = _ditrt("inspect", TINY_CHECKPOINT, "--num-heads", "4")
    assert r.returncode == 0, r.stderr
    assert "official DiT-layout checkpoint" in r.stdout and "parameters 183,200" in r.stdout and "GMACs" in r.stdout
    info = json.loads(_ditrt("inspect", TINY_CHECKPOINT, "--num-heads", "4", "--json").stdout)
    assert info["config"]["depth"] == 2 and info["parameters"] == 183200 and info["pos_embed_max_deviation_from_sincos"] < 1e-6


def test_inspect_reports_problems_with_exit_code_2(tmp_path):
    r = _ditrt("inspect", TINY_CHECKPOINT)
    assert r.returncode == 2 and "cannot infer num_heads" in r.stderr
    assert _ditrt("inspect", tmp_path / "none.pt").returncode == 2


def test_version_and_help():
    r = _ditrt("--version")
    import tomllib
    from conftest import ROOT
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert r.returncode == 0 and f"version {version}" in r.stdout  # the CLI and the package agree
    for command in ("inspect", "export", "sample", "build", "parity"):
        r = _ditrt(command, "--help")
        assert r.returncode == 0 and "Usage" in r.stdout, command
