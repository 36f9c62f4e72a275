"""fast_net (whitening init, Dirac init, flip TTA), lookahead, and the fast GPU recipe run on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import symensemble as se
from symensemble.data import CIFAR10
from symensemble.distributed import DistInfo
from symensemble.models.fast_net import patch_whitening
from symensemble.training.lookahead import Lookahead, lookahead_alpha
from symensemble.training.loop import _build_optimizer, _training_net, train
from symensemble.training.recipe import Recipe, RecipeError, load_recipe

from .conftest import make_split

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SMALL = {"widths": [4, 8, 8]}


def _correlated_images(n: int = 40, seed: int = 0) -> torch.Tensor:
    """Float64 images with strongly correlated channels and neighbouring pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 12, 12, generator=g, dtype=torch.float64)
    x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="circular"), 3, stride=1)  # neighbours correlate
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.5, 0.4], [0.0, 0.0, 0.2]], dtype=torch.float64)
    return torch.einsum("dc,nchw->ndhw", mix, x) + torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)


def _output_moments(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    z = F.conv2d(images, weight, bias).transpose(0, 1).reshape(weight.shape[0], -1)  # (d, N·P)
    mean = z.mean(1)
    centred = z - mean[:, None]
    return mean, centred @ centred.T / z.shape[1]


def test_patch_whitening_gives_identity_covariance():
    images = _correlated_images()
    weight, bias = patch_whitening(images, size=2, eps=0.0)
    assert weight.shape == (12, 3, 2, 2) and bias.shape == (12,)
    mean, cov = _output_moments(images, weight, bias)  # through the convolution itself
    torch.testing.assert_close(mean, torch.zeros(12, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=1e-9, rtol=0)
    # eps > 0 shrinks each direction by λ/(λ + eps): near 1 for strong ones, small for weak ones
    eps = 1e-2
    weight_eps, bias_eps = patch_whitening(images, size=2, eps=eps, chunk=7)
    _, cov_eps = _output_moments(images, weight_eps, bias_eps)
    patches = F.unfold(images, 2).transpose(1, 2).reshape(-1, 12)
    lam = torch.linalg.eigvalsh(torch.cov(patches.T, correction=0)).flip(0)
    torch.testing.assert_close(cov_eps, torch.diag(lam / (lam + eps)), atol=1e-9, rtol=0)
    assert cov_eps.diagonal()[0] > 0.9 and cov_eps.diagonal()[-1] < 0.5


def test_patch_whitening_rejects_bad_input():
    with pytest.raises(ValueError, match="floating-point images"):
        patch_whitening(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least 3×3 pixels"):
        patch_whitening(torch.rand(2, 3, 2, 2), size=3)
    with pytest.raises(ValueError, match="singular"):
        patch_whitening(torch.ones(2, 3, 8, 8, dtype=torch.float64), eps=0.0)


def test_fast_net_whitens_its_training_images_and_freezes_the_filters():
    model = se.create_model("fast_net", hidden=4, **SMALL)
    images = (_correlated_images(60).sigmoid() * 255).round().to(torch.uint8)
    model.init_from_data(images)
    x = model.normalize(images.float() / 255)
    out = model.whiten(x).transpose(0, 1).reshape(24, -1).double()
    half = out[:12]
    # Covariance diag(λ/(λ + eps)) with λ the eigenvalues of the normalized patches (eps = 5e-4)
    patches = F.unfold(x.double(), 2).transpose(1, 2).reshape(-1, 12)
    lam = torch.linalg.eigvalsh(torch.cov(patches.T, correction=0)).flip(0)
    expected = torch.diag(lam / (lam + model.whiten_eps))
    torch.testing.assert_close(torch.cov(half, correction=0), expected, atol=2e-3, rtol=0)
    assert expected.diagonal()[0] > 0.99  # the identity along the patches' main directions
    torch.testing.assert_close(half.mean(1), torch.zeros(12, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[12:], -half)  # the negated filters beside them
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad
    optimized = {id(p) for group in _build_optimizer(model, Recipe(model="fast_net")).param_groups
                 for p in group["params"]}
    assert id(model.whiten.weight) not in optimized and id(model.whiten.bias) in optimized


def test_fast_net_stages_start_as_identities_and_tta_averages_the_mirror_image():
    torch.manual_seed(0)
    model = se.create_model("fast_net", hidden=4, **SMALL)
    conv = model.stages[2].conv2  # 8 → 8 channels: every filter is an identity
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(conv(x), x)
    model.eval()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        both = model.embed(images)
        torch.testing.assert_close(both, model.embed(images.flip(-1)))  # flip-invariant in eval mode
        model.tta_flip = False
        single, mirrored = model.embed(images), model.embed(images.flip(-1))
        torch.testing.assert_close(both, 0.5 * (single + mirrored))
        assert not torch.allclose(single, mirrored)
    with pytest.raises(ValueError, match="widths must be 3 positive integers"):
        se.create_model("fast_net", widths=[8, 8])
    with pytest.raises(ValueError, match="bn_momentum"):
        se.create_model("fast_net", bn_momentum=0.0)


def test_lookahead_interpolates_then_resets_the_fast_weights():
    assert lookahead_alpha(0, 100, 0.25) == 1.0 and lookahead_alpha(100, 100, 0.25) == pytest.approx(0.25)
    assert lookahead_alpha(50, 100, 0.25) == pytest.approx(1 - 0.75 * 0.125)
    layer = torch.nn.Linear(3, 2)
    look = Lookahead(layer, alpha_end=0.25)
    start = [p.detach().clone() for p in layer.parameters()]
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    alpha = look.sync(100, 100)
    for p, s, slow in zip(layer.parameters(), start, look.slow):
        torch.testing.assert_close(p, s + alpha * 1.0)  # φ + α(θ − φ) with θ − φ = 1
        assert torch.equal(p, slow)
    with pytest.raises(ValueError, match="lookahead alpha"):
        Lookahead(layer, alpha_end=0.0)


def test_compile_is_off_on_cpu_and_a_single_process_is_not_wrapped():
    model = se.create_model("fast_net", hidden=4, **SMALL)
    recipe = Recipe(model="fast_net", compile=True)
    assert _training_net(model, recipe, torch.device("cpu"), DistInfo()) is model


def test_fast_recipe_fields_are_validated():
    recipe = load_recipe(RECIPES / "fast_gpu.toml")
    assert recipe.model == "fast_net" and recipe.amp and recipe.channels_last
    assert recipe.lookahead_every == 5 and recipe.label_smoothing > 0 and recipe.augment
    for bad, message in [({"lookahead_every": -1}, "lookahead_every must be >= 0"),
                         ({"lookahead_alpha": 0.0}, "lookahead_alpha must be in"),
                         ({"init_samples": 0}, "init_samples must be >= 1"),
                         ({"compile": "yes"}, "compile must be true or false")]:
        with pytest.raises(RecipeError, match=message):
            recipe.replace(**bad)


def _fast_data() -> CIFAR10:
    return CIFAR10(make_split(40, seed=1), make_split(8, seed=2), make_split(12, seed=3), ("a", "b", "c"),
                   "synthetic")


def test_fast_recipe_trains_on_cpu(tmp_path, one_thread):
    """The shipped recipe at full width for 3 steps (amp, channels-last and compile are inert on CPU)."""
    data = _fast_data()
    recipe = load_recipe(RECIPES / "fast_gpu.toml").replace(
        batch_size=16, eval_batch_size=16, epochs=1, warmup_epochs=0.5, val_size=0, init_samples=30)
    res = train(recipe, data=data, out=tmp_path / "fast.safetensors", device="cpu", progress=False)
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    assert 0 <= res.history[0]["test_accuracy"] <= 1 and res.history[0]["train_loss"] > 0
    loaded = se.load_model(res.checkpoint)
    x = data.test.float_images()
    # the trained model is channels-last, the loaded one contiguous: other conv kernels, ~1e-7 apart
    torch.testing.assert_close(loaded(x), res.model(x), rtol=1e-5, atol=1e-6)
    fresh = se.create_model("fast_net", **recipe.model_config())
    subset = torch.randperm(40, generator=torch.Generator().manual_seed(recipe.seed))[:30]
    fresh.init_from_data(data.train.images[subset])
    assert torch.equal(loaded.whiten.weight, fresh.whiten.weight)  # set from the data, then frozen


def test_lookahead_run_resumes_exactly(tmp_path, one_thread):
    """Lookahead syncs at every epoch end, so a checkpoint holds the whole training state."""
    data = _fast_data()
    recipe = load_recipe(RECIPES / "fast_gpu.toml").replace(
        model_kwargs=SMALL, batch_size=16, eval_batch_size=16, epochs=2, warmup_epochs=1.0, val_size=0,
        init_samples=30, lookahead_every=2)
    full = train(recipe, data=data, out=tmp_path / "full.safetensors", device="cpu", progress=False)

    def crash(model, epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(recipe, data=data, out=tmp_path / "cut.safetensors", device="cpu", progress=False,
              callbacks=[crash])
    resumed = train(recipe, data=data, out=tmp_path / "cut.safetensors", device="cpu", progress=False,
                    resume=True)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [e["epoch"] for e in resumed.history] == [1, 2]
