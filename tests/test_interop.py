"""Outside attack libraries attack a SymmetryEnsemble as it is (issue 19, item 3).

The default output is the vote (its argmax is the majority vote) and is differentiable by a
straight-through estimator (gradient of the soft vote), so torchattacks and ART need no
options: they climb the soft vote and judge success by the vote.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from symensemble.ensembles.ensemble import SymmetryEnsemble
from symensemble.models import SymHead, SymModel

pytestmark = pytest.mark.usefixtures("one_thread")

C, SIDE = 10, 8


class SmallNet(SymModel):
    """(B, 3, 8, 8) images → tanh features → SymHead(16 → 8 → 10)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(3 * SIDE * SIDE, 16)
        self.head = SymHead(16, 8, C, "leaky_relu")
        with torch.no_grad():
            self.body.weight.mul_(4)  # sharp features: small eps moves predictions
        self.eval()

    def embed(self, x):
        return torch.tanh(self.body(x.flatten(1)))


def _setup(n: int = 16):
    model = SmallNet()
    cal = torch.rand(8 * 16, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    ens = SymmetryEnsemble(model, cal, num_members=8, eps=1.0, samples_per_member=16).eval()
    x = torch.rand(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = ens(x).argmax(1)  # labels = the clean vote: clean vote accuracy 1
    return ens, x, y


def _vote_accuracy(ens, x, y) -> float:
    with torch.no_grad():
        return float((ens(x, aggregate="vote").argmax(1) == y).float().mean())


def test_torchattacks_pgd_and_autoattack_run_on_the_ensemble_and_lower_the_vote():
    torchattacks = pytest.importorskip("torchattacks")
    ens, x, y = _setup()
    assert _vote_accuracy(ens, x, y) == 1.0
    adv = torchattacks.PGD(ens)(x, y)  # defaults: eps 8/255, 10 steps
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    pgd_acc = _vote_accuracy(ens, adv, y)
    assert pgd_acc < 1.0
    auto = torchattacks.AutoAttack(ens, n_classes=C, seed=0)  # standard: APGD-CE, -T, FAB-T, Square
    square = auto._autoattack.attacks[-1]
    assert type(square).__name__ == "Square"
    square.n_queries = 50  # (5000 by default: Square cannot climb a vote, only the test's time)
    adv = auto(x, y)
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6
    assert _vote_accuracy(ens, adv, y) <= pgd_acc


def test_art_pytorch_classifier_attacks_the_vote():
    pytest.importorskip("art")
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    ens, x, y = _setup()
    clf = PyTorchClassifier(model=ens, loss=nn.CrossEntropyLoss(), input_shape=(3, SIDE, SIDE),
                            nb_classes=C, clip_values=(0.0, 1.0), device_type="cpu")
    pred = clf.predict(x.numpy()).argmax(1)
    assert (torch.from_numpy(pred) == y).all()  # ART reads the vote
    attack = ProjectedGradientDescent(clf, eps=8 / 255, eps_step=2 / 255, max_iter=10, verbose=False)
    adv = torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6
    assert _vote_accuracy(ens, adv, y) < 1.0
