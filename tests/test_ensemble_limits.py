"""Ensembles refuse what cannot work up front, with the value, the limit and the fix (#20)."""

from __future__ import annotations

import pytest
import torch

from symensemble import runtime
from symensemble.ensembles import calibration
from symensemble.ensembles.ensemble import SymmetryEnsemble
from symensemble.models import create_model

from .test_ensemble import H_DIM, TinyNet, images

pytestmark = pytest.mark.usefixtures("one_thread")


def test_memory_estimate_refuses_a_huge_ensemble_before_allocating():
    G, s = 10**9, 2 * H_DIM
    # a view of G·s images that holds one image: converting or copying it would need ~1 TB
    cal = torch.zeros(1, 3, 4, 4, dtype=torch.uint8).expand(G * s, 3, 4, 4)
    with pytest.raises(runtime.MemoryEstimateError, match=r"num_members=1000000000.*needs about .* GiB"
                                                          r".*pass fewer members \(about [\d,]+ fit\)"):
        SymmetryEnsemble(TinyNet(), cal, num_members=G, samples_per_member=s)
    with pytest.raises(ValueError, match="fewer members"):  # baselines too: their members alone
        SymmetryEnsemble(TinyNet(), None, num_members=10**10, transform="ginv")


def test_memory_estimator_parts_and_refusal():
    parts = runtime.ensemble_memory(200, 32, 16, 10, image_bytes=3072)
    assert parts["calibration_images"] == 200 * 32 * 3072
    assert parts["calibration_hidden"] == 200 * 32 * 16 * 12
    assert parts["members"] == 200 * 8 * (16 * 16 + 10 * 16)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert runtime.ensemble_memory(200, 32, 16, 10, calibration=False)["calibration_hidden"] == 0
    runtime.require_memory(10, "x", "fix", available=100)
    with pytest.raises(runtime.MemoryEstimateError, match="work needs about .* only .* available; do less"):
        runtime.require_memory(2**31, "work", "do less", available=2**30)
    assert (runtime.available_memory() or 1) > 0


def test_distinctness_check_works_in_member_chunks(monkeypatch):
    """The (G, s, s) distances are never built at once (5 GB for s near the training split)."""
    G, s = 12, H_DIM
    cal = images(G * s, seed=1)
    cal[7 * s + 4] = cal[7 * s + 1]  # member 7 repeats an image
    seen = []
    cdist = torch.cdist

    def spy(a, b, *args, **kw):
        seen.append(a.shape[0])
        return cdist(a, b, *args, **kw)

    monkeypatch.setattr(torch, "cdist", spy)
    monkeypatch.setattr(calibration, "_DISTINCT_CHUNK_BYTES", 8 * s * s * 3)  # 3 members a chunk
    with pytest.raises(ValueError, match=rf"member 7: .* calibration images {7 * s + 1} and {7 * s + 4}"):
        SymmetryEnsemble(TinyNet(), cal, num_members=G, samples_per_member=s)
    assert seen and max(seen) <= 3


def test_enormous_calibration_noise_is_a_clear_error():
    """float32 pre-activations + 1e300·noise overflow: a ValueError naming the noise, not LAPACK's."""
    model = TinyNet()
    with pytest.raises(ValueError, match=r"calibration_noise=1e\+300 overflows the calibration pre-act"):
        SymmetryEnsemble(model, images(5 * H_DIM, seed=1), num_members=5, samples_per_member=H_DIM,
                         calibration_noise=1e300)


def test_enormous_float64_noise_runs_or_is_refused_clearly():
    model = TinyNet(dtype=torch.float64)
    cal = images(5 * H_DIM, seed=1, dtype=torch.float64)
    for noise in (1e300, 1e200):
        try:
            ens = SymmetryEnsemble(model, cal, num_members=5, samples_per_member=H_DIM,
                                   calibration_noise=noise)
        except ValueError as err:  # the only acceptable failure: a clear one
            assert "calibration_noise" in str(err) or "pre-activations" in str(err)
        else:
            assert torch.isfinite(ens.W).all() and torch.isfinite(ens.g).all()


def test_calibration_images_of_the_wrong_size_get_the_model_input_check():
    model = create_model("paper_cnn", hidden=4, channels=2).eval()
    cal = torch.rand(8, 3, 28, 28)
    with pytest.raises(ValueError, match=r"expects 32x32 images .*got 28x28 \(calibration_images\)"):
        SymmetryEnsemble(model, cal, num_members=2, samples_per_member=4)
    bad = torch.rand(8, 3, 32, 32)
    bad[5, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration_images hold 1 NaN or infinite.*sample 5"):
        SymmetryEnsemble(model, bad, num_members=2, samples_per_member=4)


def test_wide_ginv_members_under_two_threads():
    """torch's batched CPU LU gives invalid pivots for h ≥ 512 with 2 threads; members stay exact."""
    from symensemble.ensembles.transforms import _right_inverse_apply, random_gl

    g = random_gl(6, 512, 1.0, torch.Generator().manual_seed(0))
    U = torch.randn(10, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        W = _right_inverse_apply(U, g)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(W @ g, U.expand(6, -1, -1), rtol=1e-9, atol=1e-9)
