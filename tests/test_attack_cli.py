"""``symensemble attack`` and ``symensemble reproduce`` driven through click's CliRunner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torchvision.io import write_png

import symensemble as se
from symensemble.cli import main
from symensemble.data import CIFAR10_CLASSES
from symensemble.training.recipe import load_evaluation_recipe

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision.io

REPO = Path(__file__).resolve().parent.parent
CLASSES = list(CIFAR10_CLASSES)  # the loader accepts only the CIFAR-10 class folders


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> tuple[Path, Path]:
    """A class-folder CIFAR-like tree (32×32 PNGs) and a checkpoint trained on it."""
    root = tmp_path_factory.mktemp("tree")
    gen = torch.Generator().manual_seed(0)
    templates = torch.rand(10, 3, 32, 32, generator=gen)
    for split, per_class in (("train", 8), ("test", 4)):
        for c, name in enumerate(CLASSES):
            folder = root / "cifar" / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = 0.55 * templates[c] + 0.45 * torch.rand(3, 32, 32, generator=gen)
                write_png((img * 255).round().to(torch.uint8), str(folder / f"{i}.png"))
    images = []
    labels = []
    for c, name in enumerate(CLASSES):
        for f in sorted((root / "cifar" / "train" / name).iterdir()):
            from torchvision.io import read_image

            images.append(read_image(str(f)).float() / 255)
            labels.append(c)
    x, y = torch.stack(images), torch.tensor(labels)
    torch.manual_seed(0)
    model = se.create_model("paper_cnn", hidden=4, channels=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = se.save_checkpoint(model.eval(), root / "tiny.safetensors")
    return root / "cifar", ckpt


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SYMENSEMBLE_CACHE", str(tmp_path / "cache"))


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def small_args(tiny_world, out: Path, *extra: str) -> list[str]:
    data, ckpt = tiny_world
    return ["attack", "--checkpoint", str(ckpt), "--data", str(data), "--n", "20",
            "--num-members", "2", "--ensemble-eps", "0.1", "--batch-size", "10",
            "--out", str(out), "--quiet", *extra]


def test_help_lists_the_commands():
    result = run("--help")
    assert result.exit_code == 0
    assert "attack" in result.output and "reproduce" in result.output


def test_attack_prints_the_table_and_writes_every_file(tiny_world, tmp_path):
    out = tmp_path / "out"
    result = run(*small_args(tiny_world, out, "--protocol", "paper", "--eps", "0,8/255",
                             "--transforms", "original,group,ginv"))
    assert result.exit_code == 0, result.output
    assert "| transform | threat | eps=0 | eps=8/255 |" in result.output
    assert "| original | white-box |" in result.output
    assert "| group | transfer |" in result.output and "| ginv | adaptive |" in result.output
    assert "Sanity checks" in result.output
    assert {p.name for p in out.iterdir()} == {"results.json", "results.csv", "table.md",
                                               "accuracy_vs_eps.png"}
    payload = json.loads((out / "results.json").read_text())
    s = payload["settings"]
    assert s["n"] == 20 and s["eps"] == [0.0, 8 / 255] and s["attack"] == ["fgsm"]
    assert s["transforms"] == ["original", "group", "ginv"] and s["seed"] == 0
    assert set(s["versions"]) >= {"torch", "torchattacks", "symensemble"}
    assert "git_revision" in s and s["calibration"]["split"] == "train"
    assert s["command"].startswith("symensemble") and s["started_at"]
    assert len(payload["records"]) == 2 * (1 + 3 * 2)
    assert "| group | worst-case |" in result.output
    assert isinstance(payload["warnings"], list)


def test_attack_default_is_the_portfolio_with_a_per_attack_table(tiny_world, tmp_path):
    out = tmp_path / "portfolio"
    result = run(*small_args(tiny_world, out, "--eps", "0,8/255", "--transforms",
                             "original,group", "--apgd-steps", "5"))
    assert result.exit_code == 0, result.output
    assert "**portfolio**" in result.output and "| original | robust |" in result.output
    assert "| group | robust |" in result.output
    # APGD-T and APGD-T on the soft vote joined the cascade with issue 19 (item 4)
    assert "| target | eps | clean | pgd-transfer | fgsm-transfer | apgd-ce | apgd-dlr | apgd-t | " \
           "apgd-softvote | apgd-t-softvote | robust [95% CI] |" in result.output
    payload = json.loads((out / "results.json").read_text())
    s = payload["settings"]
    assert s["protocol"] == "portfolio" and s["apgd_steps"] == 5 and s["attack"] is None
    robust = [r for r in payload["records"] if r["threat"] == "robust" and r["eps"] > 0]
    assert len(robust) == 2 and all(0 <= r["accuracy"] <= 1 for r in robust)
    assert "per attack" in (out / "table.md").read_text().lower() or "apgd-ce" in (
        out / "table.md").read_text()


def test_attack_rejects_grid_options_with_the_portfolio(tiny_world, tmp_path):
    result = run(*small_args(tiny_world, tmp_path / "o", "--protocol", "portfolio",
                             "--attack", "pgd"))
    assert result.exit_code == 2
    assert "only apply to protocol 'paper'" in result.output


def test_attack_sweep_writes_the_delta_heatmap(tiny_world, tmp_path):
    out = tmp_path / "sweep"
    data, ckpt = tiny_world
    result = run("attack", "--checkpoint", str(ckpt), "--data", str(data), "--n", "20",
                 "--eps", "0", "--num-members", "1,2", "--ensemble-eps", "1,0.1",
                 "--transforms", "original,group", "--threat", "transfer", "--out", str(out),
                 "--quiet")
    assert result.exit_code == 0, result.output
    assert (out / "delta_heatmap.png").is_file()
    assert "| transform | threat | G | ens. eps=1 | ens. eps=0.1 |" in result.output


def test_portfolio_sweep_writes_the_delta_heatmap(tiny_world, tmp_path):
    out = tmp_path / "psweep"
    data, ckpt = tiny_world
    result = run("attack", "--checkpoint", str(ckpt), "--data", str(data), "--n", "20",
                 "--eps", "0,8/255", "--num-members", "2", "--ensemble-eps", "1,0.1",
                 "--transforms", "original,group", "--apgd-steps", "2", "--no-sanity",
                 "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    assert (out / "delta_heatmap.png").is_file()


def test_attack_default_out_folder(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = small_args(tiny_world, tmp_path / "x", "--eps", "0", "--transforms", "original")
    args = args[: args.index("--out")] + args[args.index("--out") + 2:]
    result = run(*args)
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("attack-") and (folder / "results.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--attack", "cw"], "unknown attack 'cw'"),
    (["--eps", "0,1.5"], "outside [0, 1]"),
    (["--eps", "abc"], "not a number"),
    (["--transforms", "original,bogus"], "unknown transform 'bogus'"),
    (["--threat", "greybox"], "unknown threat 'greybox'"),
    (["--alpha", "0"], "must be > 0"),
    (["--steps", "-1"], "below the minimum"),
    (["--num-members", "0"], "below the minimum"),
    (["--ensemble-eps", "-2"], ">= 0"),
    (["--n", "100000"], "between 1 and"),
])
def test_attack_rejects_bad_options(tiny_world, tmp_path, extra, message):
    result = run(*small_args(tiny_world, tmp_path / "o", *extra))
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_attack_missing_checkpoint_or_data(tiny_world, tmp_path):
    data, ckpt = tiny_world
    result = run("attack", "--checkpoint", str(tmp_path / "nope.safetensors"), "--data",
                 str(data), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "--checkpoint" in result.output
    assert "no checkpoint" in result.output
    result = run("attack", "--checkpoint", str(ckpt), "--data", str(tmp_path / "nodata"),
                 "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "--data" in result.output
    assert "no CIFAR-10 data" in result.output


def test_attack_cuda_without_a_gpu_names_the_device_option(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run(*small_args(tiny_world, tmp_path / "o", "--device", "cuda"))
    assert result.exit_code == 2, result.output
    assert "--device" in result.output and "no CUDA device" in result.output
    assert not (tmp_path / "o").exists()


def test_attack_unwritable_out_is_a_clear_error(tiny_world, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run(*small_args(tiny_world, blocker / "results", "--attack", "fgsm", "--eps", "0",
                             "--transforms", "original", "--no-sanity", "--no-figures"))
    assert result.exit_code == 2, result.output
    assert "--out" in result.output and "cannot write the results" in result.output


def test_evaluate_or_fail_lets_real_bugs_through(monkeypatch):
    import click

    from symensemble.commands.attack import _evaluate
    from symensemble.robustness import evaluation
    from symensemble.robustness.config import EvalConfig

    def buggy(*args, **kw):
        raise TypeError("a genuine bug")

    monkeypatch.setattr(evaluation, "evaluate", buggy)
    with pytest.raises(TypeError, match="a genuine bug"):
        _evaluate(EvalConfig(), "paper_cnn", None, quiet=True)

    def bad_value(*args, **kw):
        raise ValueError("n must be positive")

    monkeypatch.setattr(evaluation, "evaluate", bad_value)
    with pytest.raises(click.UsageError, match="recipe.toml: n must be positive"):
        _evaluate(EvalConfig(), "paper_cnn", None, quiet=True, context="recipe.toml: ")


def test_reproduce_uses_the_recipe_device_unless_overridden(tmp_path, monkeypatch):
    import click

    from symensemble.commands import attack as attack_cmd

    seen = []

    def capture(config, model, data, **kw):
        seen.append(config.device)
        raise click.UsageError("stopped after capturing the settings")

    monkeypatch.setattr(attack_cmd, "_evaluate", capture)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    recipe = tmp_path / "cpu.toml"
    recipe.write_text('[evaluate]\ndevice = "cpu"\nn = 10\n')
    assert run("reproduce", str(recipe), "--quiet").exit_code == 2
    assert run("reproduce", str(recipe), "--quiet", "--device", "cuda").exit_code == 2
    no_device = tmp_path / "auto.toml"
    no_device.write_text("[evaluate]\nn = 10\n")
    assert run("reproduce", str(no_device), "--quiet").exit_code == 2
    assert seen == ["cpu", "cuda", "cuda"]
    # a recipe asking for cuda on a machine without one: a clear error naming the recipe
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe.write_text('[evaluate]\ndevice = "cuda"\nn = 10\n')
    result = run("reproduce", str(recipe), "--quiet")
    assert result.exit_code == 2 and "no CUDA device" in result.output
    assert "device in" in result.output and "cpu.toml" in result.output
    result = run("reproduce", str(recipe), "--quiet", "--device", "cpu")
    assert seen[-1] == "cpu"


def test_reproduce_runs_a_recipe_and_compares_with_the_paper(tiny_world, tmp_path):
    data, ckpt = tiny_world
    recipe = tmp_path / "mini.toml"
    recipe.write_text(f"""
title = "mini reproduction"
[evaluate]
checkpoint = "{ckpt}"
n = 20
attack = "fgsm"
eps = [0.0, 0.05]
transforms = ["original", "group"]
num_members = 2
ensemble_eps = 0.1
threat = ["transfer", "adaptive"]
sanity = false
[paper]
source = "made up"
eps = [0.0, 0.05]
[paper.accuracy]
original = [0.6, 0.2]
group = [0.5, 0.3]
""")
    out = tmp_path / "rep"
    result = run("reproduce", str(recipe), "--data", str(data), "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    assert "Ours vs. paper (made up)" in result.output
    assert "| group | transfer |" in result.output
    assert (out / "comparison.md").read_text().startswith("# mini reproduction")
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["recipe"]["title"] == "mini reproduction"


def test_reproduce_errors(tmp_path):
    result = run("reproduce", "no_such_recipe")
    assert result.exit_code == 2 and "no recipe" in result.output and "paper_fig10" in result.output
    bad = tmp_path / "train.toml"
    bad.write_text('model = "paper_cnn"\n')
    result = run("reproduce", str(bad))
    assert result.exit_code == 2 and "[evaluate]" in result.output
    bad.write_text('[evaluate]\nwrong_key = 1\n')
    result = run("reproduce", str(bad))
    assert result.exit_code == 2 and "wrong_key" in result.output


@pytest.mark.parametrize("name", ["paper_fig10", "paper_fig11_fgsm", "paper_fig11_pgd"])
def test_shipped_recipes_parse(name):
    spec = load_evaluation_recipe(name)
    assert spec.path == REPO / "recipes" / f"{name}.toml"
    assert spec.model.startswith("paper_cnn")
    assert spec.config.protocol == "paper"  # the paper's protocol, whatever the default
    assert spec.paper["accuracy"]["original"]
    assert spec.config.samples_per_member == 16  # the paper's s = h, whatever the default
    assert (REPO / "checkpoints" / f"{spec.model}.safetensors").is_file()
    if name == "paper_fig10":
        assert spec.config.calibration_noise == 1e-4 and spec.model == "paper_cnn_notebook_relusqr"
        acc = spec.paper["accuracy"]
        assert all(len(acc[t]) == 7 and all(len(row) == 7 for row in acc[t]) for t in acc)


def _cifar_root() -> str | None:
    root = os.environ.get("SYMENSEMBLE_DATA")
    return root if root and Path(root).exists() else None


@pytest.mark.cifar
@pytest.mark.skipif(_cifar_root() is None, reason="SYMENSEMBLE_DATA has no CIFAR-10")
@pytest.mark.skipif(not (REPO / "checkpoints" / "paper_cnn.safetensors").is_file(),
                    reason="shipped checkpoint checkpoints/paper_cnn.safetensors is absent")
def test_cifar_shipped_checkpoint_transfer_pattern(tmp_path):
    out = tmp_path / "cifar"
    result = run("attack", "--protocol", "paper", "--n", "200", "--eps", "0,0.012", "--transforms",
                 "original,group,shuffle", "--num-members", "50", "--no-sanity", "--quiet",
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    records = json.loads((out / "results.json").read_text())["records"]
    acc = {(r["transform"], r["threat"], r["eps"]): r["accuracy"] for r in records}
    assert acc[("original", "whitebox", 0.0)] > 0.45
    assert acc[("shuffle", "transfer", 0.0)] < 0.25  # near chance


# ---------------------------------------------------------------------------------------------
# --model SPEC: any classifier (issue 18)
# ---------------------------------------------------------------------------------------------


def _model_args(tiny_world, out: Path, *extra: str) -> list[str]:
    data, _ = tiny_world
    return ["attack", "--data", str(data), "--n", "10", "--eps", "0,8/255", "--apgd-steps", "2",
            "--transfer-steps", "2", "--no-sanity", "--no-figures", "--quiet", "--out", str(out),
            *extra]


def test_attack_a_model_given_by_a_factory_spec(tiny_world, tmp_path):
    out = tmp_path / "factory"
    result = run(*_model_args(tiny_world, out, "--model", "tests.test_foreign:tiny_cnn",
                              "--num-classes", "10", "--normalize", "cifar10",
                              "--transforms", "original,group", "--num-members", "4"))
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["model_spec"] == "tests.test_foreign:tiny_cnn"
    assert "| original | robust |" in result.output and "| group | robust |" in result.output


def test_attack_a_torchvision_model_with_weights(tiny_world, tmp_path):
    import torchvision

    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    out = tmp_path / "tv"
    result = run(*_model_args(tiny_world, out, "--model", "torchvision:resnet18", "--weights",
                              str(weights), "--num-classes", "10", "--transforms", "original,group",
                              "--num-members", "4", "--samples-per-member", "16"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["settings"]["model_spec"] == \
        "torchvision:resnet18"
    assert "| group | robust |" in result.output


@pytest.mark.parametrize("extra, message", [
    (["--model", "tests.test_foreign:tiny_cnn", "--checkpoint", "paper_cnn"], "mutually exclusive"),
    (["--num-classes", "10"], "only apply to --model"),
    (["--model", "nonsense"], "expected 'timm:NAME'"),
    (["--model", "tests.test_foreign:tiny_cnn", "--normalize", "sepia"], "normalization 'sepia'"),
])
def test_attack_model_spec_errors(tiny_world, tmp_path, extra, message):
    result = run(*_model_args(tiny_world, tmp_path / "o", *extra))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
