"""symensemble.robustness.sanity: each warning on synthetic records and on models built to fool attacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from symensemble.data import CIFAR10
from symensemble.robustness.evaluation import evaluate
from symensemble.robustness.records import (
    ORIGINAL,
    Record,
    wilson_interval,
)
from symensemble.robustness.sanity import LARGE_EPS, sanity_checks
from tests.conftest import small, synthetic_cifar, tiny_model


@pytest.fixture(scope="module")
def world() -> tuple[nn.Module, CIFAR10]:
    data = synthetic_cifar()
    return tiny_model(data), data


# ------------------------------------------------------------------------------------------
# sanity checks: unit level on synthetic records …
# ------------------------------------------------------------------------------------------


def rec(transform="group", threat="transfer", attack="fgsm", eps=0.01, steps=1, acc=0.5,
        n=1000, **kw) -> Record:
    correct = round(acc * n)
    lo, hi = wilson_interval(correct, n)
    return Record(transform, threat, attack, eps, steps, correct / n, lo, hi, n, correct,
                  kw.get("num_members", 10), kw.get("ensemble_eps", 1.0))


def test_sanity_checks_each_warning_on_synthetic_records():
    ok = [rec(eps=0, acc=0.6), rec(eps=0.01, acc=0.3), rec(eps=0.02, acc=0.1)]
    assert sanity_checks(ok) == []
    # 1. non-monotonic in eps
    bad = [rec(eps=0, acc=0.6), rec(eps=0.01, acc=0.2), rec(eps=0.02, acc=0.5)]
    assert any(w.startswith("[non-monotonic]") for w in sanity_checks(bad))
    # ... and in steps
    bad = [rec(attack="pgd", eps=0.1, steps=1, acc=0.2), rec(attack="pgd", eps=0.1, steps=5,
                                                               acc=0.4)]
    assert any("steps=5" in w for w in sanity_checks(bad) if w.startswith("[non-monotonic]"))
    # 2. iterative weaker than FGSM
    warns = sanity_checks([rec(attack="pgd", steps=10, acc=0.4)], [rec(acc=0.2)])
    assert [w for w in warns if w.startswith("[iterative-weaker]")]
    # 3. adaptive weaker than transfer
    warns = sanity_checks([rec(threat="transfer", acc=0.2), rec(threat="adaptive", acc=0.45)])
    assert [w for w in warns if w.startswith("[gradient-masking]")]
    # 4. large eps leaves accuracy
    warns = sanity_checks([], [rec(attack="pgd", threat="adaptive", eps=LARGE_EPS, steps=10,
                                   acc=0.3)])
    assert [w for w in warns if w.startswith("[large-eps]")]
    assert sanity_checks([], [rec(attack="pgd", threat="adaptive", eps=LARGE_EPS, acc=0.0)]) == []
    # a chance-level (near-constant) classifier keeps its class share: not gradient masking
    at_chance = [rec(threat="adaptive", eps=0, acc=0.104),
                 rec(attack="pgd", threat="adaptive", eps=LARGE_EPS, steps=10, acc=0.102)]
    assert sanity_checks([], at_chance, num_classes=10) == []


def test_sanity_checks_ignore_sampling_noise():
    noise = [rec(eps=e, acc=a, n=1000)
             for e, a in [(0, 0.6), (0.003, 0.104), (0.006, 0.095), (0.009, 0.112)]]
    noise += [rec(threat="adaptive", eps=e, acc=a + 0.01)
              for e, a in [(0.003, 0.104), (0.006, 0.095), (0.009, 0.112)]]
    assert sanity_checks(noise) == []


def test_sanity_checks_skip_chance_level_targets():
    """A near-constant classifier keeps its class share under any attack: no findings."""
    rows = [rec(transform="shuffle", eps=0, acc=0.104),
            rec(transform="shuffle", eps=0.3, acc=0.046),
            rec(transform="shuffle", attack="pgd", eps=0.3, steps=1, acc=0.089),
            rec(transform="shuffle", threat="adaptive", eps=0.3, acc=0.15)]
    assert sanity_checks(rows, num_classes=10) == []
    rows[0] = rec(transform="shuffle", eps=0, acc=0.6)  # a real classifier: now a signal
    assert sanity_checks(rows, num_classes=10)


# ------------------------------------------------------------------------------------------
# … and end to end: contrived gradient-masking models trigger them
# ------------------------------------------------------------------------------------------


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class _LatticeGrad(torch.autograd.Function):
    """Gradient only on the 1/255 lattice of clean images; zero anywhere else."""

    @staticmethod
    def forward(ctx, x):
        on = ((x * 255 - (x * 255).round()).abs() < 1e-3).float()
        ctx.save_for_backward(on)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (on,) = ctx.saved_tensors
        return grad * on


class _ZeroGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class Masked(nn.Module):
    """``inner`` behind an input gate that corrupts the gradient (forward unchanged)."""

    def __init__(self, inner: nn.Module, gate: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.inner = inner
        self.gate = gate
        self.head = getattr(inner, "head", None)

    @property
    def aggregate(self):
        return self.inner.aggregate

    @aggregate.setter
    def aggregate(self, value):
        self.inner.aggregate = value

    @property
    def is_stochastic(self):
        return getattr(self.inner, "is_stochastic", False)

    def forward(self, x, **kw):  # kw: aggregate=..., as SymmetryEnsemble.forward takes
        return self.inner(self.gate.apply(x), **kw)


def test_reversed_gradients_trigger_monotonic_and_large_eps_warnings(world):
    _, data = world
    weak = tiny_model(data, steps=15)  # ~40% clean accuracy: room for "attacks" to help it
    result = evaluate(Masked(weak, _ReverseGrad), data,
                      **small(n=60, attack="pgd", eps=[0, 0.1], steps=[10],
                              transforms=[ORIGINAL], sanity=True))
    kinds = {w.split("]")[0] + "]" for w in result.warnings}
    assert "[non-monotonic]" in kinds and "[large-eps]" in kinds, result.warnings
    assert any(p.attack == "pgd" and p.eps == LARGE_EPS for p in result.probes)


def test_lattice_gradients_trigger_iterative_weaker_warning(world):
    model, data = world
    result = evaluate(Masked(model, _LatticeGrad), data,
                      **small(n=40, attack="pgd", eps=[0.1], steps=[5], transforms=[ORIGINAL],
                              sanity=True))
    assert any(w.startswith("[iterative-weaker]") for w in result.warnings), result.warnings
    assert any(p.attack == "fgsm" for p in result.probes)  # the single-step reference probe


def test_masked_ensemble_triggers_gradient_masking_warning(world):
    model, data = world

    def factory(base, calibration, **kw):
        from symensemble.ensembles.ensemble import SymmetryEnsemble

        return Masked(SymmetryEnsemble(base, calibration, **kw), _ZeroGrad)

    result = evaluate(model, data, **small(n=40, attack="fgsm", eps=[0.1, 0.3],
                                           transforms=["group"], ensemble_eps=0.01,
                                           sanity=True),
                      ensemble_factory=factory)
    kinds = {w.split("]")[0] + "]" for w in result.warnings}
    assert "[gradient-masking]" in kinds, result.warnings
    assert "[large-eps]" in kinds  # the adaptive large-eps probe cannot move a zero gradient
    assert not any("original" in w for w in result.warnings)  # the base model is healthy


def test_healthy_model_passes_the_checks(world):
    model, data = world
    result = evaluate(model, data, **small(n=40, attack="fgsm", eps=[0, 0.1, 0.3],
                                           transforms=[ORIGINAL], sanity=True))
    # FGSM alone is flagged as a weak attack at each radius; nothing else may fire
    assert [w for w in result.warnings if not w.startswith("[weak-attack]")] == []
    assert sum(w.startswith("[weak-attack] at eps=") for w in result.warnings) == 2
    probe = [p for p in result.probes if p.eps == LARGE_EPS][0]
    assert probe.accuracy <= 0.05
