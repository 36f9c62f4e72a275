"""Data-parallel training under torchrun: 2 gloo ranks give the weights of 1 process, and resume."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

import symensemble as se
from symensemble.data import CIFAR10
from symensemble.distributed import DistInfo, batch_slice
from symensemble.training.loop import _epoch_generators, _local_batch, train
from symensemble.training.recipe import Recipe

from .conftest import make_split
from .test_distributed import _run

# Global batch 10: the 33 training images end in a batch of 3 (ranks take 1 and 2), the 31
# images of "ragged" in a batch of 1 (rank 0 takes it, rank 1 runs a zero-weight step).
RECIPES = {
    "adam": dict(hidden=4, model_kwargs={"channels": 2}, batch_size=10, eval_batch_size=7, lr=3e-3,
                 epochs=2, val_size=0),
    "ragged": dict(hidden=4, model_kwargs={"channels": 2}, batch_size=10, eval_batch_size=7, lr=0.05,
                   epochs=2, val_size=0, optimizer="sgd", nesterov=True, schedule="cosine",
                   label_smoothing=0.1, weight_decay=1e-3),
}


def tiny_data(n_train: int) -> CIFAR10:
    return CIFAR10(make_split(n_train, seed=1), make_split(9, seed=2), make_split(11, seed=3),
                   ("a", "b", "c"), "synthetic")


# Run under torchrun by the test: the equivalence runs (augmentation off), an interrupted and
# resumed augmented run beside an uninterrupted one, and a fast_net epoch (BatchNorm, frozen
# whitening filters). Each rank reports whether its weights equal rank 0's checkpoint.
SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import symensemble as se
    from symensemble.training.recipe import Recipe
    from symensemble.training.loop import train
    from tests.test_train_ddp import RECIPES, tiny_data

    out, rank = Path(sys.argv[1]), int(__import__("os").environ["RANK"])
    from symensemble.distributed import distributed

    def main():
        report = {}

        def same_as_checkpoint(model, path):
            saved = se.load_model(path).state_dict()
            return all(torch.equal(saved[k], v) for k, v in model.state_dict().items())

        def run(name, recipe, n_train, **kw):
            res = train(recipe, data=tiny_data(n_train), out=out / f"{name}.safetensors", device="cpu",
                        progress=False, **kw)
            report[name] = same_as_checkpoint(res.model, res.checkpoint)
            return res

        run("adam", Recipe(**RECIPES["adam"]), 33)
        run("ragged", Recipe(**RECIPES["ragged"]), 31)
        augmented = Recipe(**{**RECIPES["adam"], "epochs": 3, "augment": True})
        full = run("full", augmented, 33)

        def crash(model, epoch, metrics):
            if epoch == 1:
                raise KeyboardInterrupt

        try:
            train(augmented, data=tiny_data(33), out=out / "cut.safetensors", device="cpu", progress=False,
                  callbacks=[crash])
        except KeyboardInterrupt:
            pass
        resumed = run("cut", augmented, 33, resume=True)
        report["resume_equal"] = all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(),
                                                                        resumed.model.state_dict().values()))
        fast = Recipe(model="fast_net", hidden=4, model_kwargs={"widths": [4, 8, 8]}, batch_size=10,
                      eval_batch_size=7, epochs=1, val_size=0, optimizer="sgd", lr=0.05, augment=True,
                      lookahead_every=2, init_samples=20)
        run("fast", fast, 33)
        (out / f"rank{rank}.json").write_text(json.dumps(report))

    with distributed("cpu"):  # the caller owns the process group, as the CLI does
        main()
""")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run SCRIPT once under torchrun with 2 gloo ranks; returns its output folder."""
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "run_train.py"
    script.write_text(SCRIPT)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(script), str(tmp)], tmp)
    return tmp


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.slow
@pytest.mark.parametrize("name, n_train", [("adam", 33), ("ragged", 31)])
def test_two_ranks_train_the_weights_of_one_process(two_ranks, tmp_path, one_thread, name, n_train):
    single = train(Recipe(**RECIPES[name]), data=tiny_data(n_train), out=tmp_path / "one.safetensors",
                   device="cpu", progress=False)
    ddp, info = se.load_model(two_ranks / f"{name}.safetensors", with_info=True)
    assert info["epoch"] == 2 and info["extra"]["complete"]
    for key, value in single.model.state_dict().items():
        assert _relative_error(ddp.state_dict()[key], value) < 1e-5, key
    torch.manual_seed(0)  # the initialization both runs started from: training moved it
    initial = se.create_model("paper_cnn", hidden=4, channels=2)
    assert _relative_error(ddp.head.V.weight, initial.head.V.weight) > 1e-3
    # The log holds global figures: the same mean loss and accuracy as the single process.
    log = json.loads((two_ranks / f"{name}.log.json").read_text())
    assert log["world_size"] == 2
    for one, two in zip(single.history, log["epochs"]):
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_two_ranks_agree_resume_exactly_and_write_once(two_ranks):
    reports = [json.loads((two_ranks / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:  # every rank ends with the weights rank 0 wrote
        assert report == {"adam": True, "ragged": True, "full": True, "cut": True, "resume_equal": True,
                          "fast": True}
    checkpoints = sorted(p.name for p in two_ranks.glob("*.safetensors"))
    assert checkpoints == ["adam.safetensors", "cut.safetensors", "fast.safetensors", "full.safetensors",
                           "ragged.safetensors"]
    assert not list(two_ranks.glob(".*tmp*"))  # no temp files left by a second writer


def test_local_batches_tile_the_global_batch_and_weight_to_its_mean():
    x, y = torch.arange(7.0).view(7, 1), torch.arange(7)
    for world in (1, 2, 3, 8):
        parts = [_local_batch(x, y, DistInfo(rank=r, world_size=world)) for r in range(world)]
        counted = torch.cat([p[1] for p in parts if p[3]])
        assert torch.equal(counted, y)  # every image once, in order
        # DDP divides the summed gradients by `world`: the weights make that the global mean.
        assert sum(p[2] for p in parts) / world == pytest.approx(1.0)
        assert all(p[2] == p[3] * world / 7 for p in parts)
    empty = _local_batch(x[:1], y[:1], DistInfo(rank=1, world_size=2))
    assert empty[2:] == (0.0, 0) and empty[0].shape[0] == 1
    assert _local_batch(x, y, DistInfo())[2:] == (1.0, 7)
    with pytest.raises(ValueError, match="batch size must be >= 0"):
        batch_slice(-1, DistInfo())


def test_rank_streams_are_reproducible_distinct_and_rank0_keeps_the_single_process_stream():
    def draws(rank: int, world: int, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        order, own = _epoch_generators(5, epoch, DistInfo(rank=rank, world_size=world))
        return torch.randperm(10, generator=order), torch.rand(4, generator=own)

    single = draws(0, 1)
    assert all(torch.equal(a, b) for a, b in zip(draws(0, 2), single))  # rank 0: the old stream
    perm1, aug1 = draws(1, 2)
    assert torch.equal(perm1, single[0])  # the same global batches on every rank
    assert not torch.equal(aug1, single[1])  # but its own augmentation
    assert torch.equal(draws(1, 2)[1], aug1)  # reproducibly
    assert not torch.equal(draws(1, 2, epoch=1)[1], aug1)
