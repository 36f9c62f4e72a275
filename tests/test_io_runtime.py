"""Shared helpers: atomic writes with the umask, JSON policy, device, eval mode, threads, figures."""

from __future__ import annotations

import json
import math
import os
import stat
import sys

import numpy as np
import pytest
import torch
from torch import nn

from symensemble import checkpoint
from symensemble.io import atomic_path, atomic_write_bytes, default_run_dir, to_jsonable, write_json
from symensemble.plotting import new_figure, save_figure
from symensemble.runtime import eval_mode, provenance, resolve_device, thread_cap


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_writes_respect_the_umask(tmp_path, mask):
    # regression (issue #13 item 9): files came out 0600 whatever the umask (mkstemp's mode)
    old = os.umask(mask)
    try:
        path = atomic_write_bytes(tmp_path / "sub" / "f.bin", b"abc")
        fig, ax = new_figure()
        ax.plot([0, 1], [1, 0])
        png = save_figure(fig, tmp_path / "f.png")
    finally:
        os.umask(old)
    for p in (path, png):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask
    assert path.read_bytes() == b"abc" and png.read_bytes()[:4] == b"\x89PNG"


def test_atomic_write_leaves_nothing_on_failure_and_old_file_intact(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert checkpoint.atomic_write_bytes is atomic_write_bytes  # still importable from checkpoint


def test_json_policy_non_finite_is_null_and_values_are_plain(tmp_path):
    obj = {"a": math.inf, "b": [float("nan"), -math.inf, 1.5], "t": torch.tensor([1.0, math.inf]),
           "s": torch.tensor(2), "np": np.array([1, 2]), "npf": np.float64("nan"), 3: (tmp_path, True)}
    assert to_jsonable(obj) == {"a": None, "b": [None, None, 1.5], "t": [1.0, None], "s": 2,
                                "np": [1, 2], "npf": None, "3": [str(tmp_path), True]}
    path = write_json(tmp_path / "r.json", obj)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text and json.loads(text)["a"] is None
    assert default_run_dir("q-x").parent.name == "runs" and default_run_dir("q-x").name.startswith("q-x-")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")


def test_eval_mode_restores_every_flag():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    net.train()
    net[1].eval()  # a submodule deliberately left in eval mode
    with eval_mode(net) as m:
        assert m is net and not any(x.training for x in net.modules())
    assert net.training and net[0].training and not net[1].training
    with pytest.raises(KeyError), eval_mode(net):
        raise KeyError
    assert net.training


def test_thread_cap_lowers_and_restores_never_raises():
    before = torch.get_num_threads()
    with thread_cap(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with thread_cap(before + 4):
        assert torch.get_num_threads() == before


def test_provenance():
    p = provenance(["symensemble", "q", "inspect"])
    assert set(p["versions"]) == {"symensemble", "torch", "torchattacks", "python"}
    assert p["versions"]["torch"] == torch.__version__ and p["command_line"][1] == "q"
    assert p["git_revision"] == checkpoint.git_revision()
    assert provenance()["command_line"] == sys.argv


def test_new_figure_does_not_switch_the_backend(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    fig, axes = new_figure(1, 2, figsize=(4, 2))
    axes[0].plot([0, 1, 2], [1, 0, 1])
    im = axes[1].imshow(np.eye(3))
    fig.colorbar(im, ax=axes[1])
    assert save_figure(fig, tmp_path / "x.png").stat().st_size > 1000
    assert matplotlib.get_backend() == backend
