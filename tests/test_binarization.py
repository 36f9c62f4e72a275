"""The binarization test (Zimmermann et al. 2022) of robustness/binarization.py: it passes on a
model whose gradients work and flags a model whose gradients are masked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from symensemble.robustness.binarization import (
    BinaryReadout,
    binarization_checks,
    binarization_test,
    registry_attack,
)
from symensemble.robustness.records import Target


class _Round(torch.autograd.Function):
    """Quantize to 8 bits with a zero gradient: the classic masked-gradient defense."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 255) / 255

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class Quantized(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(_Round.apply(x))


def smooth_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 7 * 7, 10)).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1


def test_readout_puts_the_inner_point_in_class_one():
    features = nn.Flatten()
    w, b = torch.ones(12), torch.tensor(-1.0)
    g = BinaryReadout(features, w, b, torch.zeros(12), torch.ones(12))
    x = torch.zeros(2, 3, 2, 2)
    x[1] = 1.0
    assert g(x).argmax(1).tolist() == [0, 1] and g(x).shape == (2, 2)


def test_a_working_attack_passes_every_valid_test(images):
    attack = registry_attack("apgd-ce", steps=20)
    result = binarization_test(smooth_model(), images, 8 / 255, attack, seed=0)
    assert result.valid >= 2 and result.failed == 0


def test_masked_gradients_are_flagged(images):
    attack = registry_attack("apgd-ce", steps=20)
    result = binarization_test(Quantized(smooth_model()), images, 8 / 255, attack, seed=0)
    assert result.valid >= 2 and result.failed == result.valid


def test_checks_report_only_the_masked_target(images):
    from symensemble.robustness.config import EvalConfig

    targets = [Target("original", smooth_model()), Target("group", Quantized(smooth_model()), 2, 1.0)]
    robust = torch.tensor([True, True, False])
    flags = {(t.transform, t.num_members, t.ensemble_eps, "robust", "portfolio", 8 / 255, None): robust
             for t in targets}
    flags[("group", 2, 1.0, "robust", "portfolio", 0.0, None)] = torch.ones(3, dtype=torch.bool)
    config = EvalConfig(apgd_steps=20, transforms=["original", "group"])
    warnings = binarization_checks(targets, images, flags, config)
    assert len(warnings) == 1 and warnings[0].startswith("[binarization] group (G=2")
    assert "eps=8/255" in warnings[0] and "failed 2 of 2" in warnings[0]


def test_evaluate_runs_it_under_sanity_and_flags_a_masked_model():
    import symensemble as se

    from .conftest import synthetic_cifar, tiny_model

    data = synthetic_cifar(n_train=100, n_test=30)
    # h = 16 ≥ 10 classes: logits span all 10 dimensions, so the readout can separate (with
    # h = 4 the logits lie in a 4-dimensional subspace and most tests are invalid)
    masked = Quantized(tiny_model(data, hidden=16)).eval()
    result = se.evaluate(masked, data, n=10, eps=[0.0, 8 / 255], transforms=["original"],
                         apgd_steps=10, transfer_steps=5, batch_size=10, sanity=True)
    assert any(w.startswith("[binarization] original at eps=8/255") for w in result.warnings), \
        result.warnings
    healthy = se.evaluate(tiny_model(data, hidden=16), data, n=10, eps=[0.0, 8 / 255],
                          transforms=["original"], apgd_steps=10, transfer_steps=5, batch_size=10,
                          sanity=True)
    assert not any(w.startswith("[binarization]") for w in healthy.warnings), healthy.warnings
