"""Train the digits example model on scikit-learn's 8x8 digits (1,797 images, 10 classes): a small
AutoencoderKL, then a class-conditional DiT (or SiT) on its latents, then the digit classifier the
quality metrics read samples with (`ditrt.runtime.jobs.quality`).

    python examples/digits/train_digits.py --out DIR --seed 0 [--family dit|sit] [--vae DIR]

Stages (each seeded on its own from --seed, so reusing a VAE with --vae gives the same denoiser):
1. VAE: diffusers' AutoencoderKL in the sd-vae block layout (4 down / up blocks: 8x downsampling,
   4 latent channels) with small channel counts, on the digits as 64x64 RGB in [-1, 1]
   (`quality.real_digit_images`). Loss: pixel MSE + a small KL weight (no LPIPS or GAN: the images
   are 8x8 grey levels upsampled). The latent scaling factor is computed as for SD: 1 / std of
   latents sampled from the posterior over the whole data set, stored as config.scaling_factor.
2. Denoiser, on latents sampled from the VAE posterior afresh each step, times the scaling factor
   (the official train.py's `vae.encode(x).latent_dist.sample().mul_(0.18215)`):
   - dit: the official DiT training loss (`GaussianDiffusion.training_losses`, loss_type MSE,
     learned-range variance): uniform t in 0..999, x_t = q_sample(x0, t, eps), MSE on eps plus the
     variational-bound term for the variance with the predicted mean frozen (stop-gradient).
   - sit: SiT's Linear path with velocity prediction: x_t = t x1 + (1 - t) x0, t ~ U(0, 1), x0
     noise, x1 data, loss MSE(model(x_t, t, y), x1 - x0); learn_sigma False (the network has no
     variance half, unlike SiT's released models whose second half is unused).
   Both: class dropout to the null class (LabelEmbedder.token_drop), AdamW, an EMA of the weights
   (the EMA weights are what is saved), the official DiT initialisation. No horizontal flips (the
   official train.py flips; a flipped digit is another glyph).
3. Classifier: scikit-learn's MLPClassifier (one ReLU hidden layer) on a stratified split of the real
   digits, saved as plain arrays (classifier.npz) for `quality.DigitClassifier`; its held-out accuracy
   and the samples' accuracy / Frechet distance / precision / recall go to training.json.

Deterministic given --seed and --threads (torch.use_deterministic_algorithms, one generator per
stage): two runs give bitwise-identical weights (tests/test_quality_metrics.py checks a short run).
--minutes caps the denoiser's wall time, which makes the step count (and so the weights) depend on
the machine's speed: leave it unset for reproducible weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ditrt.runtime.jobs import quality
from ditrt.runtime.spec.config import DiTConfig, Diffusion
from ditrt.runtime.sampling.schedule import respaced_schedule

from ditrt.exporter.model import DiT, count_parameters

NUM_CLASSES = 10
IMAGE_UPSAMPLE = 8  # 8x8 digits -> 64x64 images -> 8x8 latents through the 8x-downsampling VAE
FAMILIES = ("dit", "sit")
_STAGE_SEEDS = {"vae": 1, "dit": 2, "sit": 3, "classifier": 4}  # seed offsets per stage


@dataclass(frozen=True)
class VaeSettings:
    block_out_channels: tuple[int, ...] = (8, 16, 32, 32)
    layers_per_block: int = 1
    norm_num_groups: int = 4
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    # On the per-image KL sum, beside a per-pixel mean MSE. 1e-4 leaves one informative latent
    # channel and turns the other three into posterior noise. 1e-6 spreads a context-dependent code
    # over all four, which the DiT learned far more slowly (31% sample accuracy after 3000 steps at
    # lr 5e-4, against 84% for 1e-4 at lr 1e-3: not a controlled comparison).
    kl_weight: float = 1e-4

    def diffusers_config(self) -> dict:
        blocks = len(self.block_out_channels)
        return {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "silu",
                "down_block_types": ["DownEncoderBlock2D"] * blocks, "up_block_types": ["UpDecoderBlock2D"] * blocks,
                "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
                "norm_num_groups": self.norm_num_groups, "sample_size": quality.DIGIT_SIDE * IMAGE_UPSAMPLE}


@dataclass(frozen=True)
class DenoiserSettings:
    depth: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    patch_size: int = 2
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3  # 1e-4 in DiT (batch 256, 400k steps): far too slow for a few thousand steps
    weight_decay: float = 0.0  # as the official train.py
    # 0.9999 in DiT: too slow for a few thousand steps. The EMA starts as a copy of the initial
    # (zero-output) model, as in train.py, and keeps 0.999^steps of it: 13% at 2000 steps ruined the
    # samples (14% accuracy), 2% at 4000 did not.
    ema_decay: float = 0.999
    class_dropout: float = 0.1

    def config(self, family: str, latent_size: int, latent_channels: int) -> DiTConfig:
        return DiTConfig(input_size=latent_size, patch_size=self.patch_size, in_channels=latent_channels,
                         hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                         num_classes=NUM_CLASSES, learn_sigma=family == "dit")


@dataclass(frozen=True)
class ClassifierSettings:
    hidden: int = 64
    held_out: float = 0.25  # stratified fraction kept out of training, for the reported accuracy
    alpha: float = 1e-3  # L2 penalty
    max_iter: int = 2000


@dataclass(frozen=True)
class EvalSettings:
    per_class: int = 20  # balanced labels: 0..9, each this many times
    sampler: str = "ddim"  # the DiT's
    sit_sampler: str = "ode-euler"  # the SiT's
    steps: int = 50
    cfg_scale: float = 4.0


Log = Callable[[str], None]


# ---- set-up -------------------------------------------------------------------------------------

def configure_determinism(threads: int) -> None:
    """Same seed and thread count -> same bits: fixed intra-op threads (reductions split by thread
    count), deterministic kernels only."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (it can only be set once per process)
        pass
    torch.use_deterministic_algorithms(True)


def stage_seed(seed: int, stage: str) -> int:
    return seed * 1000 + _STAGE_SEEDS[stage]


def stage_generator(seed: int, stage: str) -> torch.Generator:
    return torch.Generator().manual_seed(stage_seed(seed, stage))


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: (1797, 8, 8) grey levels 0..16 (float64) and labels (1797,)."""
    from sklearn.datasets import load_digits as sklearn_digits
    data = sklearn_digits()
    return data.images, data.target.astype(np.int64)


def training_images(levels: np.ndarray) -> torch.Tensor:
    """(N, 3, 64, 64) float32 in [-1, 1]: what the VAE is trained on and the classifier reads back."""
    return torch.from_numpy(quality.real_digit_images(levels, IMAGE_UPSAMPLE))


def _batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless shuffled batches of indices (a fresh permutation per epoch, the last partial batch dropped)."""
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


class _Progress:
    """Prints step, the losses' means since the last line, and the elapsed time every `every` steps;
    `last` (what training.json records as "final") holds the means of the last interval."""

    def __init__(self, name: str, steps: int, log: Log, every: int):
        self.name, self.steps, self.log, self.every = name, steps, log, every
        self.start = time.perf_counter()
        self.sums: dict[str, float] = {}
        self.count = 0
        self.last: dict[str, float] = {}

    def add(self, step: int, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        if step % self.every == 0 or step == self.steps:
            self.last = {k: v / self.count for k, v in self.sums.items()}
            shown = "  ".join(f"{k} {v:.4f}" for k, v in self.last.items())
            self.log(f"{self.name} step {step}/{self.steps}  {shown}  elapsed {self.elapsed:.0f} s")
            self.sums, self.count = {}, 0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ---- stage 1: the VAE ---------------------------------------------------------------------------

def train_vae(images: torch.Tensor, settings: VaeSettings, seed: int, log: Log) -> tuple[torch.nn.Module, dict]:
    """A diffusers AutoencoderKL trained on `images` (N, 3, 64, 64); returns it (eval mode) and a summary."""
    import diffusers
    gen = stage_generator(seed, "vae")
    torch.manual_seed(stage_seed(seed, "vae"))  # diffusers' init draws from the global generator
    vae = diffusers.AutoencoderKL.from_config(settings.diffusers_config())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.lr, weight_decay=0.0)
    progress = _Progress("vae", settings.steps, log, every=100)
    batches = _batches(len(images), settings.batch_size, gen)
    vae.train()
    for step in range(1, settings.steps + 1):
        x = images[next(batches)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        reconstruction = vae.decode(z).sample
        mse = (reconstruction - x).pow(2).mean()
        kl = posterior.kl().mean()  # per image, summed over latent elements
        loss = mse + settings.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.add(step, loss=loss.item(), mse=mse.item(), kl=kl.item())
    vae.eval().requires_grad_(False)
    return vae, {"steps": settings.steps, "seconds": round(progress.elapsed, 1), "final": progress.last,
                 "parameters": count_parameters(vae)}


@torch.no_grad()
def posterior_statistics(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std per image, (N, 4, 8, 8) each."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start:start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(mean: torch.Tensor, std: torch.Tensor, gen: torch.Generator) -> float:
    """SD's recipe: 1 / std of posterior samples (one per image, all elements pooled)."""
    latents = mean + std * torch.randn(mean.shape, generator=gen)
    return float(1.0 / latents.double().std())


@torch.no_grad()
def reconstruction_error(vae, images: torch.Tensor, mean: torch.Tensor) -> dict:
    """How far the decoded posterior means land from the inputs, in the classifier's 0..16 levels."""
    decoded = _decode_batches(vae, mean)
    diff = quality.classifier_input(decoded.numpy()) - quality.classifier_input(images.numpy())
    return {"levels_rms": float(np.sqrt((diff ** 2).mean())), "levels_max_abs": float(np.abs(diff).max())}


# ---- stage 2: the denoiser ----------------------------------------------------------------------

class DiTTrainingLoss:
    """DiT's `GaussianDiffusion.training_losses` for an eps-predicting, learned-range-variance model
    with loss_type MSE, over the official 1000-step linear process (as train.py builds it:
    `create_diffusion("")`, a SpacedDiffusion keeping every step). Tables are float64, gathered per
    sample and cast to float32, as the official `_extract_into_tensor`."""

    def __init__(self, config: DiTConfig):
        diffusion = Diffusion(variance="learned_range" if config.learn_sigma else "fixed_large")
        self.schedule = respaced_schedule(diffusion, diffusion.num_train_timesteps)
        self.num_timesteps = len(self.schedule)
        s = self.schedule
        self.tables = {name: torch.from_numpy(np.asarray(value, dtype=np.float64)) for name, value in {
            "sqrt_ac": np.sqrt(s.alphas_cumprod), "sqrt_one_minus_ac": np.sqrt(1.0 - s.alphas_cumprod),
            "sqrt_recip_ac": s.sqrt_recip_alphas_cumprod, "sqrt_recipm1_ac": s.sqrt_recipm1_alphas_cumprod,
            "coef1": s.posterior_mean_coef1, "coef2": s.posterior_mean_coef2,
            "min_log": s.posterior_log_variance_clipped, "max_log": s.log_betas}.items()}

    def _at(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return self.tables[name][t].float()[:, None, None, None]  # (N, 1, 1, 1)

    def __call__(self, model: DiT, x0: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Batch means of loss = mse + vb, for x0 (N, C, H, W) and labels (N,)."""
        t = torch.randint(0, self.num_timesteps, (len(x0),), generator=gen)  # uniform over 0..999
        noise = torch.randn(x0.shape, generator=gen)
        x_t = self.q_sample(x0, t, noise)
        terms = self.terms(model(x_t, t, labels), x0, x_t, t, noise)
        return {"loss": (terms["mse"] + terms["vb"]).mean(), "mse": terms["mse"].mean(), "vb": terms["vb"].mean()}

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at("sqrt_ac", t) * x0 + self._at("sqrt_one_minus_ac", t) * noise

    def terms(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
              noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample (N,) mse and vb (bits per dimension) for a model output (N, 2C, H, W)."""
        eps, variance_values = model_output.split(x0.shape[1], dim=1)
        mse = (noise - eps).pow(2).mean(dim=(1, 2, 3))
        # The variance learns from the variational bound with the mean held fixed (eps detached).
        x0_pred = self._at("sqrt_recip_ac", t) * x_t - self._at("sqrt_recipm1_ac", t) * eps.detach()
        model_mean = self._at("coef1", t) * x0_pred + self._at("coef2", t) * x_t
        frac = (variance_values + 1) / 2
        model_log_var = frac * self._at("max_log", t) + (1 - frac) * self._at("min_log", t)
        true_mean = self._at("coef1", t) * x0 + self._at("coef2", t) * x_t
        true_log_var = self._at("min_log", t)
        kl = 0.5 * (-1.0 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var))
        kl_bits = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
        nll_bits = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        return {"mse": mse, "vb": torch.where(t == 0, nll_bits, kl_bits)}  # the decoder NLL at t = 0, else the KL


def _discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) of a Gaussian integrated over x's 8-bit bin (width 2/255), the edge bins open-ended;
    the normal CDF with the tanh approximation, as the official diffusion_utils."""
    def cdf(v):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    inv_std = torch.exp(-log_scale)
    cdf_plus = cdf(inv_std * (x - mean + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (x - mean - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def sit_training_loss(model: DiT, x1: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """SiT's `training_losses` for the Linear path with velocity prediction: t ~ U(0, 1) (train_eps
    0 for this path), x0 noise, x_t = t x1 + (1 - t) x0, target u_t = x1 - x0."""
    n = len(x1)
    t = torch.rand(n, generator=gen)
    x0 = torch.randn(x1.shape, generator=gen)
    t_ = t[:, None, None, None]
    x_t = t_ * x1 + (1 - t_) * x0
    velocity = model(x_t, t, labels)
    mse = (velocity - (x1 - x0)).pow(2).mean(dim=(1, 2, 3))
    return {"loss": mse.mean(), "mse": mse.mean()}


def official_init(model: DiT, gen: torch.Generator) -> DiT:
    """The official `DiT.initialize_weights`: Xavier-uniform linears (and the patch embedding as a
    linear) with zero biases, N(0, 0.02) label table and timestep MLP weights, zeroed adaLN
    modulations and final layer (every block starts as the identity). pos_embed is left as built
    (the fixed sin-cos table)."""
    def xavier_uniform(weight: torch.Tensor) -> None:
        fan_out, fan_in = weight.shape[0], weight[0].numel()
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        weight.copy_((torch.rand(weight.shape, generator=gen) * 2 - 1) * bound)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                xavier_uniform(module.weight)
                module.bias.zero_()
        xavier_uniform(model.x_embedder.proj.weight)
        model.x_embedder.proj.bias.zero_()
        model.y_embedder.embedding_table.weight.copy_(
            torch.randn(model.y_embedder.embedding_table.weight.shape, generator=gen) * 0.02)
        for layer in (model.t_embedder.mlp[0], model.t_embedder.mlp[2]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.02)
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.zero_()
            block.adaLN_modulation[-1].bias.zero_()
        for layer in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
            layer.weight.zero_()
            layer.bias.zero_()
    return model


def train_denoiser(family: str, latent_mean: torch.Tensor, latent_std: torch.Tensor, scaling_factor: float,
                   labels: torch.Tensor, settings: DenoiserSettings, seed: int, log: Log,
                   minutes: float | None = None, every: tuple[int, Callable[[int, DiT], None]] | None = None
                   ) -> tuple[DiT, dict]:
    """Train a DiT (`family` "dit") or SiT ("sit") on posterior samples of the digits' latents
    times the scaling factor; returns the EMA model (eval mode) and a summary. `every` (n, fn)
    calls fn(step, ema_model) every n steps (to watch sample quality during training)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use {' or '.join(FAMILIES)}")
    gen = stage_generator(seed, family)
    config = settings.config(family, latent_mean.shape[-1], latent_mean.shape[1])
    model = official_init(DiT(config), gen).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # pos_embed is fixed
    ema_params = dict(ema.named_parameters())
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=settings.lr, weight_decay=settings.weight_decay)
    loss_fn = DiTTrainingLoss(config) if family == "dit" else sit_training_loss
    progress = _Progress(family, settings.steps, log, every=250)
    batches = _batches(len(labels), settings.batch_size, gen)
    deadline = None if minutes is None else time.perf_counter() + 60.0 * minutes
    step = 0
    for step in range(1, settings.steps + 1):
        idx = next(batches)
        x = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)) * scaling_factor
        drop = torch.rand(len(idx), generator=gen) < settings.class_dropout  # token_drop: the null class
        y = torch.where(drop, torch.full_like(labels[idx], config.null_class), labels[idx])
        terms = loss_fn(model, x, y, gen)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        with torch.no_grad():
            for name, p in trainable:
                ema_params[name].mul_(settings.ema_decay).add_(p.detach(), alpha=1 - settings.ema_decay)
        progress.add(step, **{k: v.item() for k, v in terms.items()})
        if every is not None and step % every[0] == 0:
            every[1](step, ema)
        if deadline is not None and time.perf_counter() > deadline:
            log(f"{family}: --minutes {minutes} reached after {step} steps")
            break
    summary = {"config": config.to_dict(), "steps": step, "seconds": round(progress.elapsed, 1),
               "final": progress.last, "parameters": count_parameters(ema)}
    return ema, summary


# ---- sampling (the runtime's samplers over the torch model) -------------------------------------

def sample(model: DiT, family: str, labels: np.ndarray, sampler: str, steps: int, cfg_scale: float,
           seed: int) -> np.ndarray:
    """Latents (N, C, H, W) from the runtime's own pipeline (the sampler registry's loop, official
    guidance, the seeded noise stream) over the torch model: what `runtime.load(...).sample` computes
    for the exported model, without an export."""
    from ditrt.runtime.spec.config import FAMILIES
    from ditrt.runtime.artifact.manifest import Manifest, network_section, new_manifest
    from ditrt.runtime.spec.networks import denoiser_spec
    from ditrt.runtime.execution.pipeline import Pipeline

    from ditrt.exporter.torch_backend import TorchBackend
    fam, config = FAMILIES[family], model.config
    process = fam.default_process(config)
    spec = denoiser_spec(config, fam, process)
    data = new_manifest(family=fam, config=config, model_extra={}, source={"kind": "in-memory"},
                        networks={"denoiser": network_section(spec, {})}, versions={})
    pipe = Pipeline(TorchBackend(model, spec), Manifest(data, Path("."), graphs_required=False))
    return pipe.sample(labels, num_steps=steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed, progress=False)


@torch.no_grad()
def decode(vae, latents: np.ndarray, scaling_factor: float) -> np.ndarray:
    """(N, 3, 64, 64) images from DiT-scale latents: vae.decode(latents / scaling_factor).sample."""
    z = torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32)) / scaling_factor
    return _decode_batches(vae, z).numpy()


def _decode_batches(vae, z: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """vae.decode(z).sample, in batches (a whole data set at once would not fit)."""
    return torch.cat([vae.decode(z[s:s + batch_size]).sample for s in range(0, len(z), batch_size)])


# ---- stage 3: the classifier --------------------------------------------------------------------

def train_classifier(levels: np.ndarray, labels: np.ndarray, settings: ClassifierSettings,
                     seed: int) -> tuple[quality.DigitClassifier, object, dict]:
    """scikit-learn's MLPClassifier on `classifier_input(real images) * 1/16`, on a stratified split;
    returns the numpy classifier, the sklearn model and a summary with the held-out accuracy."""
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    inputs = quality.classifier_input(quality.real_digit_images(levels, IMAGE_UPSAMPLE)) / quality.DIGIT_LEVELS
    random_state = stage_seed(seed, "classifier")
    train_x, test_x, train_y, test_y = train_test_split(inputs, labels, test_size=settings.held_out, stratify=labels,
                                                        random_state=random_state)
    mlp = MLPClassifier(hidden_layer_sizes=(settings.hidden,), activation="relu", alpha=settings.alpha,
                        max_iter=settings.max_iter, random_state=random_state)
    mlp.fit(train_x, train_y)
    classifier = quality.DigitClassifier(mlp.coefs_[0], mlp.intercepts_[0], mlp.coefs_[1], mlp.intercepts_[1],
                                         mlp.classes_, 1.0 / quality.DIGIT_LEVELS)
    summary = {"kind": "sklearn MLPClassifier", "settings": asdict(settings), "train_images": len(train_y),
               "held_out_images": len(test_y), "held_out_accuracy": float(mlp.score(test_x, test_y)),
               "train_accuracy": float(mlp.score(train_x, train_y)), "iterations": int(mlp.n_iter_)}
    return classifier, mlp, summary


# ---- the whole run ------------------------------------------------------------------------------

def evaluate(images: np.ndarray, labels: np.ndarray, classifier: quality.DigitClassifier,
             real_features: np.ndarray) -> dict:
    scores = quality.digit_scores(classifier, images, labels, real_features)
    return {k: round(v, 4) for k, v in scores.items()}


def save_vae(vae, scaling_factor: float, directory: Path) -> None:
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(str(directory), safe_serialization=True)


def save_denoiser(model: DiT, path: Path, family: str) -> None:
    from safetensors.torch import save_file
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    # One metadata key: safetensors writes its metadata map in hash order, so several keys would make
    # two runs' files differ in their header bytes (same weights).
    save_file(state, str(path), metadata={"ditrt": json.dumps({"family": family, "config": model.config.to_dict()},
                                                              sort_keys=True)})


def versions() -> dict:
    import diffusers
    import sklearn
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "scikit-learn": sklearn.__version__, "numpy": np.__version__}


def run(out: Path, seed: int = 0, family: str = "dit", threads: int = 1, vae_dir: Path | None = None,
        vae_settings: VaeSettings = VaeSettings(), denoiser_settings: DenoiserSettings = DenoiserSettings(),
        minutes: float | None = None, eval_settings: EvalSettings = EvalSettings(), log: Log = print) -> dict:
    """Every stage; writes vae/, classifier.npz, {family}.safetensors and training.json under `out`
    (an existing training.json is updated: a dit run and a sit run can share a folder)."""
    configure_determinism(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "training.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record.update({"data": {"source": "sklearn.datasets.load_digits", "images": 0, "image_size": 0,
                            "mapping": "level / 8 - 1, nearest upsampling x8, grey in R, G and B "
                                       "(ditrt.runtime.jobs.quality.real_digit_images)"},
                   "seed": seed, "threads": threads, "versions": versions()})
    levels, labels = load_digits()
    images = training_images(levels)
    record["data"].update(images=len(images), image_size=images.shape[-1])

    if vae_dir is None:
        log(f"training the VAE ({vae_settings.steps} steps) ...")
        vae, vae_summary = train_vae(images, vae_settings, seed, log)
        mean, std = posterior_statistics(vae, images)
        scaling_factor = latent_scaling_factor(mean, std, stage_generator(seed, "vae"))
        vae_summary.update(settings=asdict(vae_settings), scaling_factor=scaling_factor,
                           reconstruction=reconstruction_error(vae, images, mean))
        save_vae(vae, scaling_factor, out / "vae")
        record["vae"] = vae_summary
        log(f"vae: scaling factor {scaling_factor:.5f}, reconstruction {vae_summary['reconstruction']}")
    else:
        from ditrt.exporter.vae import load_vae
        loaded = load_vae(vae_dir)
        vae, scaling_factor = loaded.model, loaded.scaling_factor
        mean, std = posterior_statistics(vae, images)
        log(f"vae: reusing {vae_dir} (scaling factor {scaling_factor:.5f})")

    classifier, _, classifier_summary = train_classifier(levels, labels, ClassifierSettings(), seed)
    classifier.save(out / "classifier.npz")
    record["classifier"] = classifier_summary
    real_features = classifier.features(images.numpy())
    log(f"classifier: held-out accuracy {classifier_summary['held_out_accuracy']:.4f}")

    log(f"training the {family} ({denoiser_settings.steps} steps) ...")
    model, summary = train_denoiser(family, mean, std, scaling_factor, torch.from_numpy(labels), denoiser_settings,
                                    seed, log, minutes)
    save_denoiser(model, out / f"{family}.safetensors", family)
    summary["settings"] = {**asdict(denoiser_settings), "optimizer": "AdamW", "minutes_cap": minutes,
                           "ema": "of every trainable parameter after each step; the EMA weights are saved",
                           "loss": "DiT training_losses (mse + vb, learned range)" if family == "dit"
                           else "SiT Linear path, velocity, MSE"}

    ev = eval_settings
    eval_labels = np.repeat(np.arange(NUM_CLASSES), ev.per_class)
    start = time.perf_counter()
    sampler = ev.sampler if family == "dit" else ev.sit_sampler
    latents = sample(model, family, eval_labels, sampler, ev.steps, ev.cfg_scale, seed)
    how = f"runtime {sampler} {ev.steps} steps over the torch EMA model, cfg {ev.cfg_scale} official guidance"
    samples = decode(vae, latents, scaling_factor)
    summary["samples"] = {"how": how, "images": len(eval_labels), "seed": seed,
                          "seconds": round(time.perf_counter() - start, 1),
                          **evaluate(samples, eval_labels, classifier, real_features)}
    record["real_data_self_check"] = evaluate(images.numpy(), labels, classifier, real_features)
    record[family] = summary
    log(f"{family}: samples {summary['samples']}")
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python examples/digits/train_digits.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Output folder (the shipped one: exporter/data/digits).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=FAMILIES, default="dit")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the weights' bits depend on it; 1 is ~3x faster than 2 on shared cores).")
    parser.add_argument("--vae", type=Path, help="Reuse a trained VAE folder instead of training one.")
    parser.add_argument("--vae-steps", type=int, default=VaeSettings.steps)
    parser.add_argument("--steps", type=int, default=DenoiserSettings.steps, help="Denoiser training steps.")
    parser.add_argument("--lr", type=float, default=DenoiserSettings.lr, help="Denoiser learning rate.")
    parser.add_argument("--ema-decay", type=float, default=DenoiserSettings.ema_decay)
    parser.add_argument("--minutes", type=float, help="Cap on the denoiser's wall time (breaks reproducibility).")
    parser.add_argument("--eval-per-class", type=int, default=EvalSettings.per_class,
                        help="Samples per class for the recorded sample scores.")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    record = run(args.out, args.seed, args.family, args.threads, args.vae, VaeSettings(steps=args.vae_steps),
                 DenoiserSettings(steps=args.steps, lr=args.lr, ema_decay=args.ema_decay), args.minutes,
                 EvalSettings(per_class=args.eval_per_class))
    print(f"done in {time.perf_counter() - start:.0f} s: {args.out} "
          f"({args.family} samples: {record[args.family]['samples']})")


if __name__ == "__main__":
    main()
