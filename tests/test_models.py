"""The model contract for every registered model, and the activations' declared properties."""

from __future__ import annotations

import pytest
import torch

import symensemble as se
from symensemble.models import SymHead, SymModel
from symensemble.symmetry.activations import create_activation, list_activations


@pytest.mark.parametrize("name", se.list_models())
def test_model_contract(name):
    torch.manual_seed(0)
    model = se.create_model(name, hidden=8).eval()
    assert isinstance(model, SymModel) and isinstance(model.head, SymHead)
    assert model.model_name == name and model.model_args == {"hidden": 8}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats, H = model(x), model.embed(x), model.hidden(x)
    assert logits.shape == (2, 10) and H.shape == (2, 8) and feats.shape == (2, model.head.in_features)
    torch.testing.assert_close(logits, model.head(feats), rtol=0, atol=0)
    torch.testing.assert_close(H, model.head.V(feats), rtol=0, atol=0)
    torch.testing.assert_close(logits, model.head.U(model.head.act(H)), rtol=1e-6, atol=1e-6)
    assert model.get_classifier() is model.head
    assert torch.equal(model.forward_head(feats, pre_logits=True), feats)


def test_paper_cnn_architecture():
    m = se.create_model("paper_cnn")
    assert (m.conv.in_channels, m.conv.out_channels, m.conv.kernel_size) == (3, 32, (3, 3))
    assert (m.head.in_features, m.head.hidden_features, m.head.num_classes) == (8192, 16, 10)
    assert m.head.act.name == "leaky_relu" and m.head.act.negative_slope == 0.1


def test_model_normalizes_inside():
    m = se.create_model("paper_cnn").eval()
    with pytest.raises(ValueError, match="expected images of shape"):
        m(torch.rand(2, 1, 32, 32))
    assert torch.allclose(m.normalize.mean.flatten(), torch.tensor([0.4914, 0.4822, 0.4465]))


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        se.create_model("resnet9000")
    with pytest.raises(ValueError, match="bad arguments"):
        se.create_model("paper_cnn", widht=3)
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        se.create_model("paper_cnn", hidden=0)
    with pytest.raises(ValueError, match="unknown activation"):
        se.create_model("paper_cnn", act="swishy")


# --- activations ---------------------------------------------------------------------------

def _z(*shape):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2


@pytest.mark.parametrize("name", list_activations())
def test_declared_homogeneity_holds(name):
    act = create_activation(name)
    z, c = _z(64, 5), torch.rand(64, 1, dtype=torch.float64) * 3 + 0.1
    alpha = act.homogeneous_degree
    if alpha is None:
        assert not torch.allclose(act(c * z), c * act(z))
    else:
        torch.testing.assert_close(act(c * z), c**alpha * act(z))
        # Positive diagonal scaling acts with pi(g) = g^alpha (Example 3.3).
        g = torch.rand(5, dtype=torch.float64) + 0.5
        torch.testing.assert_close(act(z * g), act(z) * g**alpha)


@pytest.mark.parametrize("name", list_activations())
def test_declared_nonvanishing_holds(name):
    act = create_activation(name)
    z = _z(2000, 3)
    if act.nonvanishing:
        assert (act(z).abs().amax(-1) > 0).all()
    else:  # a counterexample: a nonzero z with sigma(z) = 0
        candidates = {"relu": -torch.ones(3), "relu_sqr": torch.full((3,), -0.01 / 0.1**2)}
        zero = candidates[name].double()
        assert act(zero).abs().max() < 1e-12
    assert act.nonzero_at_zero == bool(act(torch.zeros(1, 3, dtype=torch.float64)).abs().max() > 0)


def test_radial_is_orthogonally_equivariant():
    act = create_activation("radial")
    q, _ = torch.linalg.qr(_z(6, 6))
    z = _z(10, 6)
    torch.testing.assert_close(act(z @ q.T), act(z) @ q.T)
    assert act.radial and not act.pointwise
    shifted = create_activation("radial", profile="shifted_relu", shift=1.0)
    assert shifted(torch.full((1, 4), 0.1)).abs().max() == 0 and not shifted.nonvanishing


def test_activation_config_round_trip_and_errors():
    for name in list_activations():
        act = create_activation(name)
        again = create_activation(**act.config())
        assert again.config() == act.config()
    with pytest.raises(ValueError, match="negative_slope"):
        create_activation("leaky_relu", negative_slope=-1)
    with pytest.raises(ValueError, match="bad arguments"):
        create_activation("tanh", slope=2)
    with pytest.raises(ValueError, match="profile"):
        create_activation("radial", profile="cubic")
