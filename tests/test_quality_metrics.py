"""The digits quality metrics (runtime/jobs/quality.py) against independent references: scikit-learn's
own MLPClassifier, scipy's general matrix square root, hand-computed Gaussians and point sets whose
precision / recall follow from their construction; and the shipped digits model's files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ditrt.runtime.jobs import quality
from ditrt.runtime.core.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "exporter" / "data" / "digits"
TRAINING_PROGRAM = ROOT / "examples" / "digits" / "train_digits.py"  # a program, not part of the installed package


def training_program():
    """examples/digits/train_digits.py as a module (it needs torch: callers skip without it)."""
    import importlib.util
    if "train_digits" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_digits", TRAINING_PROGRAM)
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_digits"] = module
        spec.loader.exec_module(module)
    return sys.modules["train_digits"]


@pytest.fixture(scope="module")
def sklearn_digits():
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn (a test dependency) is not installed")
    data = datasets.load_digits()
    return data.images, data.target


# ---- the image mapping --------------------------------------------------------------------------

def test_real_digit_images_layout(sklearn_digits):
    levels, _ = sklearn_digits
    images = quality.real_digit_images(levels[:5])
    assert images.shape == (5, 3, 64, 64) and images.dtype == np.float32
    assert images.min() >= -1 and images.max() <= 1
    # pixel (r, c) of the digit fills the 8x8 block at (8r.., 8c..) in all three channels: level / 8 - 1
    r, c = 3, 5
    block = images[2, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8]
    assert np.all(block == np.float32(levels[2, r, c] / 8 - 1))


def test_classifier_input_inverts_the_preparation_exactly(sklearn_digits):
    levels, _ = sklearn_digits
    for upsample in (1, 8):
        back = quality.classifier_input(quality.real_digit_images(levels, upsample))
        assert np.array_equal(back, levels.reshape(len(levels), 64)), upsample


def test_classifier_input_clips_then_averages_by_hand():
    # one 16x16 image (2x2 blocks): channels differ, one value out of range (clipped to 1 first)
    image = np.full((1, 3, 16, 16), -1.0, np.float32)
    image[0, 0, 0:2, 0:2] = 3.0  # R of block (0, 0) -> clipped to 1
    image[0, 1, 2:4, 0:2] = 0.5  # G of block (1, 0), half of the block
    image[0, 1, 2:4, 0:1] = -1.0
    levels = quality.classifier_input(image).reshape(8, 8)
    assert levels[0, 0] == pytest.approx((np.mean([1, -1, -1]) + 1) * 8)  # 16/3
    assert levels[1, 0] == pytest.approx((np.mean([(0.5 - 1) / 2, -1, -1]) + 1) * 8)  # 2
    assert levels.sum() == pytest.approx(levels[0, 0] + levels[1, 0])


def test_image_mapping_refuses_bad_input():
    with pytest.raises(InputError, match="multiples of 8"):
        quality.classifier_input(np.zeros((1, 3, 12, 12), np.float32))
    with pytest.raises(InputError, match="NaN"):
        quality.classifier_input(np.full((1, 3, 8, 8), np.nan, np.float32))
    with pytest.raises(InputError, match="0..16"):
        quality.real_digit_images(np.full((1, 8, 8), 17))


# ---- the classifier -----------------------------------------------------------------------------

def test_numpy_classifier_equals_sklearn(sklearn_digits):
    """The numpy MLP on prepared images == scikit-learn's predict_proba on the raw digits / 16."""
    neural_network = pytest.importorskip("sklearn.neural_network")
    levels, labels = sklearn_digits
    mlp = neural_network.MLPClassifier(hidden_layer_sizes=(16,), max_iter=200, random_state=0)
    with pytest.warns(Warning):  # not converged in 200 iterations: irrelevant here
        mlp.fit(levels.reshape(len(levels), 64) / 16, labels)
    clf = quality.DigitClassifier(mlp.coefs_[0], mlp.intercepts_[0], mlp.coefs_[1], mlp.intercepts_[1], mlp.classes_, 1 / 16)
    images = quality.real_digit_images(levels)
    expected = mlp.predict_proba(levels.reshape(len(levels), 64) / 16)
    assert np.abs(clf.predict_proba(images) - expected).max() <= 1e-12
    assert np.array_equal(clf.predict(images), mlp.predict(levels.reshape(len(levels), 64) / 16))


@pytest.mark.slow  # refits the MLP: ~10 s on an idle core, ~50 s on shared ones
def test_shipped_classifier_equals_sklearn_refit(sklearn_digits):
    """classifier.npz is what train_classifier fitted: refitting with the recorded settings and seed
    gives a scikit-learn model whose predict_proba the shipped arrays reproduce (and the held-out
    accuracy recorded in training.json)."""
    pytest.importorskip("sklearn.neural_network")
    pytest.importorskip("torch")
    train_digits = training_program()
    levels, labels = sklearn_digits
    record = json.loads((DIGITS / "training.json").read_text())
    shipped = quality.DigitClassifier.load(DIGITS / "classifier.npz")
    _, mlp, summary = train_digits.train_classifier(levels, labels, train_digits.ClassifierSettings(), record["seed"])
    expected = mlp.predict_proba(levels.reshape(len(levels), 64) / 16)
    assert np.abs(shipped.predict_proba(quality.real_digit_images(levels)) - expected).max() <= 1e-12
    assert summary["held_out_accuracy"] == record["classifier"]["held_out_accuracy"] >= 0.95


def test_classifier_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    clf = quality.DigitClassifier(rng.normal(size=(64, 5)), rng.normal(size=5), rng.normal(size=(5, 10)),
                                  rng.normal(size=10), np.arange(10), 1 / 16)
    clf.save(tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:  # plain arrays, no pickled objects
        assert sorted(z.files) == sorted(quality.DigitClassifier.ARRAYS)
    back = quality.DigitClassifier.load(tmp_path / "c.npz")
    x = rng.uniform(-1, 1, size=(4, 3, 8, 8)).astype(np.float32)
    assert np.array_equal(back.predict_proba(x), clf.predict_proba(x))
    np.savez(tmp_path / "bad.npz", hidden_weight=np.zeros((64, 5)))
    with pytest.raises(InputError, match="missing"):
        quality.DigitClassifier.load(tmp_path / "bad.npz")


# ---- Frechet distance ---------------------------------------------------------------------------

def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's calculate_frechet_distance (scipy.linalg.sqrtm of the product)."""
    linalg = pytest.importorskip("scipy.linalg")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12)) + 0.5
    ours, reference = quality.frechet_distance(a, b), _scipy_frechet(a, b)
    assert ours == pytest.approx(reference, rel=1e-9)
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_diagonal_gaussians_by_hand():
    """Points with exactly the wanted mean and (diagonal, ddof 1) covariance: the distance is
    ||mu_a - mu_b||^2 + sum_i (s_a,i - s_b,i)^2 with s the standard deviations."""
    def points(mu, sd):
        # +-1 columns orthogonal to each other: mean 0, sample covariance exactly I * n / (n - 1)
        signs = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float)  # (4, 3)
        unit = signs * np.sqrt(3 / 4)  # ddof-1 variance 1 per column
        return mu + unit * sd
    mu_a, sd_a = np.array([0.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])
    mu_b, sd_b = np.array([1.0, 1.0, 0.0]), np.array([2.0, 2.0, 1.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2  # 10
    assert quality.frechet_distance(points(mu_a, sd_a), points(mu_b, sd_b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_refuses_mismatched_features():
    with pytest.raises(InputError, match="widths differ"):
        quality.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(InputError, match=r"N >= 2"):
        quality.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# ---- precision / recall -------------------------------------------------------------------------

def test_precision_recall_on_constructed_sets():
    """By hand, k = 3. Real: x = 0..9 on a line; the 3rd nearest other point is 2 away (3 for the
    end points). Fake: cluster A at x = 0, 0.1, 0.2, 0.3 and cluster B at x = 50 .. 50.3; each fake
    point's 3rd nearest other point is in its own cluster, 0.2 or 0.3 away.
    Precision: A lies within 0.3 of real x = 0 (inside its radius-3 ball), B is 41 from the nearest
    real point -> 4 / 8. Recall: only real x = 0 is inside a fake ball (distance 0; real x = 1 is 0.7
    from the nearest fake point, beyond radius 0.3) -> 1 / 10."""
    real = np.stack([np.arange(10.0), np.zeros(10)], axis=1)
    xs = np.array([0.0, 0.1, 0.2, 0.3, 50.0, 50.1, 50.2, 50.3])
    fake = np.stack([xs, np.zeros(8)], axis=1)
    precision, recall = quality.precision_recall(real, fake, k=3)
    assert precision == pytest.approx(4 / 8)
    assert recall == pytest.approx(1 / 10)
    # k = 1: fake radii 0.1; real x = 0 still the only one covered; the real manifold (radius 1)
    # still holds all of A and none of B
    assert quality.precision_recall(real, fake, k=1) == (pytest.approx(0.5), pytest.approx(0.1))


def test_precision_recall_ball_includes_its_boundary():
    """k = 1 on the real line 0..9: every real ball has radius 1. A fake point exactly 1 above x = 4
    is on the boundary, which counts as inside (the paper's f(x) = 1 if ||x - r|| <= NND_k(r))."""
    real = np.stack([np.arange(10.0), np.zeros(10)], axis=1)
    fake = np.array([[4.0, 1.0], [4.0, 1.5], [20.0, 0.0], [21.0, 0.0]])
    assert quality.precision_recall(real, fake, k=1) == (0.25, 0.0)


def test_precision_recall_known_extremes():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 4))
    assert quality.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    far = real + 100.0  # a copy far away: nothing inside the other's manifold
    assert quality.precision_recall(real, far, k=3) == (0.0, 0.0)
    # fake = a tight cluster at one real point: every fake point is inside (precision 1), and the
    # tiny fake balls cover only the real points they sit on (recall 1/300)
    cluster = real[7] + 1e-6 * rng.normal(size=(50, 4))
    precision, recall = quality.precision_recall(real, cluster, k=3)
    assert precision == 1.0 and recall == pytest.approx(1 / 300)


def test_precision_recall_chunking_does_not_change_the_answer():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(257, 6)), rng.normal(size=(130, 6)) * 1.3
    assert quality.precision_recall(real, fake, k=3, chunk=16) == quality.precision_recall(real, fake, k=3, chunk=4096)


# ---- the runtime stays torch-free ---------------------------------------------------------------

def test_quality_imports_neither_torch_nor_sklearn():
    code = ("import sys; import ditrt.runtime.jobs.quality; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sklearn', 'scipy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- the shipped digits model -------------------------------------------------------------------

def test_shipped_weights_load():
    """dit.safetensors reads as an official-layout checkpoint (num_heads given: no named config has
    depth 4 x hidden 128) and vae/ as a diffusers AutoencoderKL whose scaling factor is the one
    training.json recorded."""
    pytest.importorskip("torch")
    from ditrt.exporter.checkpoints import load_checkpoint
    from ditrt.exporter.vae import load_vae
    record = json.loads((DIGITS / "training.json").read_text())
    ckpt = load_checkpoint(DIGITS / "dit.safetensors", num_heads=4)
    assert ckpt.format == "official" and ckpt.notes == []  # float32, official keys, nothing converted
    assert ckpt.config.to_dict() == record["dit"]["config"]
    assert (ckpt.config.depth, ckpt.config.hidden_size, ckpt.config.input_size, ckpt.config.num_classes,
            ckpt.config.learn_sigma) == (4, 128, 8, 10, True)
    vae = load_vae(DIGITS / "vae", in_channels=ckpt.config.in_channels)
    assert vae.format == "safetensors" and vae.upsampling == 8
    assert vae.scaling_factor == record["vae"]["scaling_factor"] != 0.18215
    if (DIGITS / "sit.safetensors").exists():
        sit = load_checkpoint(DIGITS / "sit.safetensors", num_heads=4)
        assert sit.config.learn_sigma is False and sit.config.to_dict() == record["sit"]["config"]


def test_shipped_record_meets_the_targets():
    record = json.loads((DIGITS / "training.json").read_text())
    assert record["dit"]["samples"]["accuracy"] >= 0.9
    assert record["classifier"]["held_out_accuracy"] >= 0.95


# ---- training (examples/digits/train_digits.py) -----------------------------------------------------

# The official DiT `create_diffusion("").training_losses` (facebookresearch/DiT, diffusion/) on the
# inputs `_loss_case` builds, run once with the official code: per-sample mse and vb.
OFFICIAL_MSE = [1.5970221757888794, 1.375809907913208, 1.6545219421386719, 1.5239726305007935, 1.524575114250183,
                1.3904436826705933]
OFFICIAL_VB = [2.9244332313537598, 0.8398098349571228, 0.1787070482969284, 0.012118885293602943,
               0.02242199517786503, 0.02047008089721203]


def _loss_case():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(123)
    x0 = torch.from_numpy(rng.uniform(-1, 1, (6, 4, 8, 8)).astype(np.float32))
    x0[0, 0, 0, :3] = torch.tensor([-1.0, 1.0, 0.999])  # the t = 0 NLL's open edge bins
    noise = torch.from_numpy(rng.standard_normal((6, 4, 8, 8)).astype(np.float32))
    output = torch.from_numpy(rng.uniform(-1.2, 1.2, (6, 8, 8, 8)).astype(np.float32))
    return x0, noise, output, torch.tensor([0, 1, 10, 500, 998, 999])


def test_dit_training_loss_equals_the_official_training_losses():
    DiTTrainingLoss = training_program().DiTTrainingLoss
    from ditrt.runtime.spec.config import DiTConfig
    x0, noise, output, t = _loss_case()
    loss = DiTTrainingLoss(DiTConfig(input_size=8, hidden_size=64, depth=1, num_heads=4, num_classes=10))
    terms = loss.terms(output, x0, loss.q_sample(x0, t, noise), t, noise)
    np.testing.assert_allclose(terms["mse"].numpy(), OFFICIAL_MSE, rtol=1e-6)
    np.testing.assert_allclose(terms["vb"].numpy(), OFFICIAL_VB, rtol=1e-5)


def test_dit_training_loss_freezes_the_mean_in_the_bound():
    """vb trains only the variance channels, mse only the eps channels (the official stop-gradient)."""
    DiTTrainingLoss = training_program().DiTTrainingLoss
    from ditrt.runtime.spec.config import DiTConfig
    x0, noise, output, t = _loss_case()
    output.requires_grad_(True)
    loss = DiTTrainingLoss(DiTConfig(input_size=8, hidden_size=64, depth=1, num_heads=4, num_classes=10))
    terms = loss.terms(output, x0, loss.q_sample(x0, t, noise), t, noise)
    (grad_vb,) = __import__("torch").autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    (grad_mse,) = __import__("torch").autograd.grad(terms["mse"].sum(), output)
    assert grad_vb[:, :4].abs().max() == 0 and grad_vb[:, 4:].abs().max() > 0
    assert grad_mse[:, 4:].abs().max() == 0 and grad_mse[:, :4].abs().max() > 0


def _short_training(seed: int):
    """A VAE and a DiT of the shipped architecture, trained a few steps on a slice of the digits."""
    torch = pytest.importorskip("torch")
    T = training_program()
    T.configure_determinism(1)
    levels, labels = T.load_digits()
    images = T.training_images(levels[:32])
    vae, _ = T.train_vae(images, T.VaeSettings(steps=2, batch_size=8), seed, log=lambda m: None)
    mean, std = T.posterior_statistics(vae, images)
    scale = T.latent_scaling_factor(mean, std, T.stage_generator(seed, "vae"))
    dit, _ = T.train_denoiser("dit", mean, std, scale, torch.from_numpy(labels[:32]),
                              T.DenoiserSettings(steps=10, batch_size=8), seed, log=lambda m: None)
    return vae.state_dict(), dit.state_dict(), scale


def test_short_training_runs_are_bitwise_identical(sklearn_digits):
    torch = pytest.importorskip("torch")
    first, second, other = _short_training(0), _short_training(0), _short_training(1)
    for a, b in zip(first[:2], second[:2]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first[2] == second[2]
    assert not torch.equal(first[1]["blocks.0.attn.qkv.weight"], other[1]["blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_training_script_runs_are_bitwise_identical(sklearn_digits, tmp_path):
    """`python examples/digits/train_digits.py` twice with a few hundred steps: every weight file equal byte for byte."""
    pytest.importorskip("torch")
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        cmd = [sys.executable, str(TRAINING_PROGRAM), "--out", str(out), "--seed", "0", "--threads", "1",
               "--vae-steps", "200", "--steps", "300", "--eval-per-class", "2"]
        subprocess.run(cmd, check=True, capture_output=True)
        outs.append(out)
    for name in ("dit.safetensors", "vae/diffusion_pytorch_model.safetensors", "classifier.npz"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


