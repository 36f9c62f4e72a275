"""symensemble.distributed, and ``torchrun --nproc_per_node 2`` giving single-process counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from symensemble.distributed import DistInfo, all_reduce_sum, init_distributed, rank_device, shard

REPO = Path(__file__).resolve().parent.parent


def test_shard_is_round_robin_and_covers_everything():
    items = list(range(7))
    parts = [shard(items, DistInfo(rank=r, world_size=3)) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(parts, [])) == items
    assert shard(items, DistInfo()) == items


def test_single_process_defaults(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo() and not info.enabled and info.is_main
    counts = torch.tensor([1, 2, 3])
    assert all_reduce_sum(counts, info) is counts
    assert rank_device("cuda", DistInfo(rank=1, world_size=2, local_rank=1)) == torch.device(
        "cuda", 1)
    assert rank_device("cpu", DistInfo(rank=1, world_size=2)) == torch.device("cpu")


def test_bad_environment_is_reported(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        init_distributed("cpu")


# The same evaluation, in one process and under torchrun with 2 ranks: synthetic data and a
# seeded random model are rebuilt identically in every process; rank 0 writes the counts.
SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)  # identical numerics in every process
    import symensemble as se
    from symensemble.data import CIFAR10, Split
    from symensemble.distributed import distributed, is_main_process

    gen = torch.Generator().manual_seed(0)
    templates = torch.rand(10, 3, 32, 32, generator=gen)

    def split(n):
        labels = torch.arange(10).repeat_interleave(n // 10)
        img = 0.55 * templates[labels] + 0.45 * torch.rand(n, 3, 32, 32, generator=gen)
        return Split((img * 255).round().to(torch.uint8), labels)

    data = CIFAR10(split(100), split(10), split(60), tuple("abcdefghij"), "synthetic")
    torch.manual_seed(0)
    model = se.create_model("paper_cnn", hidden=4, channels=2).eval()
    with distributed("cpu"):  # the caller owns the process group
        result = se.evaluate(model, data, n=50, attack=["fgsm", "pgd"], eps=[0, 0.03],
                             steps=[2], transforms=["original", "group", "random"],
                             num_members=3, ensemble_eps=1.0, batch_size=8, sanity=True,
                             resample_members=False)
        stochastic = se.evaluate(model, data, n=30, attack="fgsm", eps=[0.03], batch_size=8,
                                 transforms=["group"], num_members=2, ensemble_eps=1.0,
                                 resample_members=True, eot_iter=2, sanity=False)
        portfolio = se.evaluate(model, data, n=30, eps=[0, 0.03], batch_size=8,
                                transforms=["original", "group"], num_members=2,
                                ensemble_eps=1.0, apgd_steps=3, sanity=False)
        main = is_main_process()
    if main:
        out = {"records": [r.to_dict() for r in result.records],
               "probes": [r.to_dict() for r in result.probes],
               "stochastic": [r.to_dict() for r in stochastic.records],
               "portfolio": [r.to_dict() for r in portfolio.records],
               "world_size": result.settings["world_size"]}
        with open(sys.argv[1], "w") as fh:
            json.dump(out, fh)
""")


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path):
    script = tmp_path / "run_eval.py"
    script.write_text(SCRIPT)
    _run([sys.executable, str(script), str(tmp_path / "one.json")], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(script), str(tmp_path / "two.json")], tmp_path)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    for key in ("records", "probes", "stochastic", "portfolio"):
        assert [r["correct"] for r in one[key]] == [r["correct"] for r in two[key]], key
        assert one[key] == two[key]
    assert len(one["records"]) > 10 and one["probes"]
