"""The one head abstraction: find_head on SymModels, SymHeads and MLPs; HeadParts composition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import symensemble
from symensemble.models import SymHead, create_model
from symensemble.symmetry.heads import HeadParts, find_head

F64 = torch.float64


def test_find_head_of_a_symmodel_reproduces_the_model():
    model = create_model("paper_cnn", hidden=5, channels=2).double().eval()
    parts = find_head(model)
    assert parts.V is model.head.V and parts.U is model.head.U and parts.act is model.head.act
    assert (parts.hidden_features, parts.num_classes, parts.pool) == (5, 10, "none")
    x = torch.rand(3, 3, 32, 32, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(parts(x), model(x), rtol=0, atol=1e-12)
        assert parts.hidden(x).shape == (3, 5)
    linears, acts = parts.layers()
    assert linears == [model.head.V, model.head.U] and acts == [model.head.act]
    assert parts.params().widths == (model.head.V.in_features, 5, 10)


def test_find_head_of_a_symhead_and_an_mlp():
    head = SymHead(4, 6, 3).double()
    parts = find_head(head)
    e = torch.randn(7, 4, dtype=F64)
    torch.testing.assert_close(parts(e), head(e), rtol=0, atol=0)
    mlp = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    parts = find_head(mlp)
    assert parts.V is mlp[2] and parts.act is mlp[3] and parts.U is mlp[4]
    x = torch.randn(4, 5, dtype=F64)
    torch.testing.assert_close(parts(x), mlp(x), rtol=0, atol=0)
    linears, acts = parts.layers()
    assert linears == [mlp[0], mlp[2], mlp[4]] and acts == [mlp[1], mlp[3]]


def test_spatial_head_pools_after_the_activation():
    conv = nn.Conv2d(3, 6, 3, padding=1).double()
    fc = nn.Linear(6, 4).double()
    parts = HeadParts(conv, None, torch.relu, fc, pool="avg")
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    expected = fc(torch.relu(conv(x)).mean((2, 3)))
    torch.testing.assert_close(parts(x), expected, rtol=0, atol=1e-14)
    assert parts.spatial and parts.hidden_features == 6
    with pytest.raises(ValueError, match="not an nn.Linear"):
        parts.layers()
    with pytest.raises(ValueError, match="unknown pool"):
        HeadParts(conv, None, torch.relu, fc, pool="max")


def test_find_head_errors_name_what_was_expected():
    class NoSymHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, 3)

    with pytest.raises(ValueError, match="not a SymHead"):
        find_head(NoSymHead())
    with pytest.raises(ValueError, match="cannot find a stack"):
        find_head(nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="must be nn.Linear"):
        find_head(nn.Sequential(nn.ReLU(), nn.Linear(3, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="odd number"):
        find_head(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


def test_public_name_points_at_the_one_definition():
    assert symensemble.HeadParts is HeadParts
