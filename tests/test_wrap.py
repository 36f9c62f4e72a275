"""Wrapping foreign classifiers (#18): locate_head and SymmetryEnsemble.from_model on spatial heads.

Random weights with BatchNorm statistics taken from the calibration images (as a trained
network's are): without them every image gives nearly the same features and σ(g Z) has dead
channels, which no trained network shows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import symensemble as se
from symensemble.ensembles.ensemble import SymmetryEnsemble
from symensemble.ensembles.locate import locate_head

pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_from_data(model: nn.Module, x: torch.Tensor) -> nn.Module:
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # the cumulative average of this one pass
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = self.relu1(self.bn1(x))
        return self.conv2(self.relu2(self.bn2(self.conv1(o)))) + self.shortcut(o)


class TinyWRN(nn.Module):
    """RobustBench-style pre-activation WideResNet: in-place ReLU, functional avg_pool2d, view."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block1, self.block2 = PreActBlock(16, 16, 1), PreActBlock(16, width, 2)
        self.bn1, self.relu = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        self.fc, self.n_channels = nn.Linear(width, 10), width

    def forward(self, x):
        out = self.relu(self.bn1(self.block2(self.block1(self.conv1(x)))))
        return self.fc(F.avg_pool2d(out, 8).view(-1, self.n_channels))


def _images(n: int, side: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _check_identity_and_members(model: nn.Module, side: int, channels: int, members: int = 2) -> None:
    cal = _images(members * channels, side, seed=1)
    _bn_from_data(model, cal)
    x = _images(6, side, seed=2)
    ident = SymmetryEnsemble.from_model(model, x, transform="identity", num_members=2)
    with torch.no_grad():
        assert _rel(ident.member_logits(x)[1], model(x)) <= 1e-4
    ens = SymmetryEnsemble.from_model(model, cal, num_members=members, eps=1.0,
                                      samples_per_member=channels, head_dtype=torch.float64)
    assert ens.hidden_features == channels
    with torch.no_grad():
        for k in range(members):
            own = cal[k * channels : (k + 1) * channels]
            assert _rel(ens.member_logits(own)[k], model(own)) <= 1e-4  # exact on its own images
        assert not torch.allclose(ens.member_logits(x)[0], model(x), rtol=0, atol=1e-6)  # moved
        assert ens(x).shape == (6, 10)


def test_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    spec = locate_head(_bn_from_data(model, _images(32, 8, 0)), _images(4, 8, 0))
    assert (spec.hidden, spec.pool, spec.classifier, spec.channels) == ("layer4.1.add", "avg", "fc", 512)
    assert "layer4.1.add" in str(spec)
    _check_identity_and_members(model, side=8, channels=512, members=1)


def test_timm_resnet18():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    _check_identity_and_members(model, side=8, channels=512, members=1)


def test_preact_wideresnet_with_inplace_relu_and_functional_pooling():
    model = TinyWRN()
    spec = locate_head(_bn_from_data(model, _images(32, 16, 0)), _images(4, 16, 0))
    assert (spec.hidden, spec.pool, spec.spatial) == ("bn1", "avg", (8, 8))
    _check_identity_and_members(model, side=16, channels=32)


def test_fallbacks_hook_callable_and_clear_errors():
    model = _bn_from_data(TinyWRN(), _images(32, 16, 0))
    x = _images(4, 16, 3)
    bn = locate_head(model, x, hidden="bn1")  # a graph node (here also a submodule)
    assert bn.hidden == "bn1" and bn.max_error <= 1e-6
    with pytest.raises(ValueError, match="does not reproduce model.*pass hidden="):
        locate_head(model, x, hidden="block2")  # Z is bn1's output, not block2's
    fn = locate_head(model, x, hidden=lambda im: model.bn1(model.block2(model.block1(model.conv1(im)))),
                     act=nn.ReLU(), classifier="fc")
    assert fn.hidden == "<callable>" and fn.max_error <= 1e-6

    class Untraceable(TinyWRN):  # data-dependent control flow: torch.fx cannot trace it
        def forward(self, x):
            return super().forward(x) if float(x.mean()) > -1 else x

    odd = _bn_from_data(Untraceable(), _images(32, 16, 0))
    with pytest.raises(ValueError, match="cannot be traced"):
        locate_head(odd, x)
    hooked = locate_head(odd, x, hidden="bn1", act=nn.ReLU(), classifier="fc")  # a cloned hook capture
    assert hooked.max_error <= 1e-6  # the in-place ReLU after bn1 did not change the captured Z
    torchvision = pytest.importorskip("torchvision")

    class Wrapped(nn.Module):  # an untraceable wrapper around torchvision's resnet18
        def __init__(self):
            super().__init__()
            self.net = torchvision.models.resnet18(num_classes=10)

        def forward(self, x):
            return self.net(x) if float(x.mean()) > -1 else x

    with pytest.raises(ValueError, match="ran 2 times"):  # BasicBlock calls one relu module twice
        locate_head(Wrapped().eval(), _images(2, 8, 0), hidden="net.layer4.1.relu", act=nn.ReLU())

    class TokenHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.fc = nn.Linear(12, 8), nn.Linear(8, 10)

        def forward(self, tokens):
            return self.fc(self.proj(tokens)[:, 0])

    with pytest.raises(ValueError, match=r"could not locate the head.*last graph nodes.*pass hidden="):
        locate_head(TokenHead(), torch.rand(2, 5, 12))


def test_public_names():
    assert se.locate_head is locate_head
    assert SymmetryEnsemble.from_model.__doc__


def test_block_mode_on_a_tiny_vit_mlp():
    """The group action on blocks.1.mlp.fc1 → GELU → fc2: members agree at fc2's output on their
    own s·T ≤ h calibration positions, so the logits agree on those images."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
                            embed_dim=24, depth=2, num_heads=2, num_classes=10).eval()
    names = {"hidden": "blocks.1.mlp.fc1", "classifier": "blocks.1.mlp.fc2", "pool": "block"}
    h, tokens = 96, 5  # mlp width; 4 patches + the class token
    s = h // tokens
    cal, x = _images(2 * s, 16, seed=1), _images(3, 16, seed=2)
    ident = SymmetryEnsemble.from_model(vit, x, transform="identity", num_members=2, **names)
    ens = SymmetryEnsemble.from_model(vit, cal, num_members=2, eps=1.0, samples_per_member=s, **names)
    assert ens.hidden_features == h and ens._positions == tokens
    with torch.no_grad():
        assert _rel(ident.member_logits(x)[0], vit(x)) <= 1e-4
        for k in range(2):
            own = cal[k * s : (k + 1) * s]
            assert _rel(ens.member_logits(own)[k], vit(own)) <= 1e-4
        assert _rel(ens.member_logits(x)[0], vit(x)) > 1e-6  # elsewhere the member differs
        assert ens(x).shape == (3, 10)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ens(xg, aggregate="mean").sum(), xg)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="nn.Linear V and U"):
        SymmetryEnsemble.from_model(vit, cal, pool="block", hidden="blocks.1.mlp.act",
                                    classifier="blocks.1.mlp.fc2", act=torch.nn.GELU())


def test_spatial_group_axioms_identity_element_and_seeds():
    """eps = 0 draws g = I: every member is the model everywhere; the same seed gives the same
    members, another seed others; float32 members agree with float64 ones to ~1e-3."""
    model = _bn_from_data(TinyWRN(), _images(64, 16, 0))
    cal, x = _images(2 * 64, 16, seed=1), _images(5, 16, seed=2)
    flat = SymmetryEnsemble.from_model(model, cal, num_members=2, eps=0.0, head_dtype=torch.float64)
    assert flat.samples_per_member == 64  # the default s = 2C
    with torch.no_grad():
        ref = model(x)
        assert _rel(flat.member_logits(x)[1], ref) <= 1e-5
        a = SymmetryEnsemble.from_model(model, cal, num_members=2, eps=1.0, seed=3)
        b = SymmetryEnsemble.from_model(model, cal, num_members=2, eps=1.0, seed=3)
        c = SymmetryEnsemble.from_model(model, cal, num_members=2, eps=1.0, seed=4)
        assert a.head_dtype == torch.float32 and torch.equal(a.W, b.W) and not torch.equal(a.W, c.W)
        d = SymmetryEnsemble.from_model(model, cal, num_members=2, eps=1.0, seed=3, head_dtype=torch.float64)
        assert _rel(a.member_logits(x), d.member_logits(x)) <= 1e-2
    with pytest.raises(ValueError, match="spatial heads support .*'group'"):
        SymmetryEnsemble.from_model(model, cal, num_members=2, transform="shuffle")


def test_inactive_channels_are_refused_with_the_fix():
    model = _bn_from_data(TinyWRN(), _images(64, 16, 0))
    with torch.no_grad():
        model.bn1.bias.fill_(-10.0)  # Z ≈ -10·1: σ(g Z) has channels that are off on every image
    cal = _images(64, 16, seed=1)
    with pytest.raises(ValueError, match=r"member 0: pooled σ\(g_k Z\).*rank-deficient.*ridge="):
        SymmetryEnsemble.from_model(model, cal, num_members=2, eps=1.0, samples_per_member=32)
    ens = SymmetryEnsemble.from_model(model, cal, num_members=2, eps=1.0, samples_per_member=32,
                                      ridge=1e-12)
    assert torch.isfinite(ens.W).all()


def test_from_model_on_a_dense_head_is_the_dense_path():
    """features → fc1 → LeakyReLU → fc2 located by the graph walk: no pooling, members exact at s = h."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 12), nn.Tanh(), nn.Linear(12, 6), nn.LeakyReLU(0.2),
                        nn.Linear(6, 4)).double().eval()
    cal = torch.rand(3 * 6, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    spec = locate_head(net, cal)
    assert (spec.hidden, spec.pool, spec.channels, spec.spatial) == ("3", "none", 6, ())
    ens = SymmetryEnsemble.from_model(net, cal, num_members=3, eps=1.0, samples_per_member=6)
    assert ens.head_dtype == torch.float64
    with torch.no_grad():
        for k in range(3):
            own = cal[k * 6 : (k + 1) * 6]
            assert _rel(ens.member_logits(own)[k], net(own)) <= 1e-8


def test_locate_head_traces_through_the_input_normalization():
    """load_foreign_model(..., normalize=...) puts Normalize in front of the network: torch.fx
    traces through it (its shape check is skipped on proxies and still refuses bad input)."""
    from symensemble.models.foreign import load_foreign_model

    model = load_foreign_model("tests.test_foreign:tiny_cnn", num_classes=10, normalize="cifar10")
    spec = locate_head(model, _images(4, 16, 0))
    assert (spec.hidden, spec.act, spec.pool, spec.classifier, spec.channels) == (
        "model.0", "model.1", "avg", "model.4", 8)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        model(torch.rand(2, 1, 16, 16))


def test_hooked_output_clones_on_request_and_refuses_a_module_run_twice():
    """The one forward-hook capture behind hidden=<submodule> and block mode (ensembles/block.py)."""
    from symensemble.ensembles.block import hooked_output

    lin, relu = nn.Linear(3, 3), nn.ReLU(inplace=True)
    once = nn.Sequential(lin, relu)
    x = torch.tensor([[1.0, -2.0, 3.0], [-1.0, 0.5, -0.5]])
    with torch.no_grad():
        lin.weight.copy_(torch.eye(3))
        lin.bias.zero_()
        kept = hooked_output(once, lin, x, clone=True, error=str)
        raw = hooked_output(once, lin, x, clone=False, error=str)
        torch.testing.assert_close(kept, lin(x), rtol=0, atol=0)  # the clone missed the in-place ReLU
        assert (raw >= 0).all() and (lin(x) < 0).any()  # the raw capture is the very tensor ReLU overwrote
    twice = nn.Sequential(lin, lin)
    with pytest.raises(ValueError, match="^ran 2 times$"):
        hooked_output(twice, lin, x, clone=False, error=lambda n: f"ran {n} times")
