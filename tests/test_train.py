"""Recipes, the training loop (learning, schedules, resume equivalence) and `symensemble train`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import symensemble as se
from symensemble.cli import main
from symensemble.training.loop import _lr_factor, train, training_loss
from symensemble.training.recipe import Recipe, RecipeError, load_recipe

from .conftest import SHIPPED, real_cifar_root, write_image_tree

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TINY = dict(hidden=4, model_kwargs={"channels": 2}, batch_size=16, eval_batch_size=64, lr=3e-3,
            epochs=3, val_size=0)


@pytest.mark.parametrize("name", ["paper_cnn", "paper_cnn_relusqr", "resnet18", "paper_cnn_notebook",
                                  "paper_cnn_notebook_relusqr"])
def test_shipped_recipes_parse(name):
    r = load_recipe(RECIPES / f"{name}.toml")
    se.create_model(r.model, **r.model_config())
    if name == "paper_cnn":  # the paper's settings
        settings = (r.optimizer, r.lr, r.batch_size, r.epochs, r.hidden, r.augment)
        assert settings == ("adam", 1e-3, 32, 10, 16, False)
        assert r.act == "leaky_relu" and r.act_kwargs == {"negative_slope": 0.1}


def test_recipe_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('modle = "paper_cnn"\n')
    with pytest.raises(RecipeError, match="unknown keys \\['modle'\\]"):
        load_recipe(bad)
    bad.write_text("lr = 'fast'\n")
    with pytest.raises(RecipeError, match="lr must be of type float"):
        load_recipe(bad)
    bad.write_text("epochs = [1\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "none.toml")
    with pytest.raises(RecipeError, match="optimizer must be one of"):
        Recipe(optimizer="lbfgs")
    with pytest.raises(RecipeError, match="model must be one of"):
        Recipe(model="resnet9000")
    with pytest.raises(RecipeError, match="act must be one of"):
        Recipe(act="swish")
    bad.write_text('betas = ["a", 0.9]\n')
    with pytest.raises(RecipeError, match="betas must be a list of 2 numbers"):
        load_recipe(bad)
    bad.write_text("betas = [true, 0.9]\n")
    with pytest.raises(RecipeError, match="betas must be a list of 2 numbers"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="betas must both be in"):
        Recipe(betas=(0.9, 1.5))
    assert Recipe().replace(epochs=3, lr=None).epochs == 3
    assert Recipe().replace(lr=1).lr == 1.0  # ints are accepted for floats


def test_notebook_recipe_matches_the_authors_notebook():
    """The settings of ensemble_CIFAR.ipynb: x − 0.5 inputs, conv slope 0.01, loss on softmax
    outputs, the last 20% of the training set held out."""
    r = load_recipe(RECIPES / "paper_cnn_notebook.toml")
    assert (r.loss, r.val_size, r.optimizer, r.lr, r.batch_size, r.epochs) == (
        "double_softmax", 10000, "adam", 1e-3, 32, 10)
    model = se.create_model(r.model, **r.model_config())
    assert model.conv_act.negative_slope == 0.01
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.normalize(x), x - 0.5)
    relu_sqr = load_recipe(RECIPES / "paper_cnn_notebook_relusqr.toml")
    assert relu_sqr.act == "relu_sqr" and relu_sqr.replace(act="leaky_relu",
                                                           act_kwargs={"negative_slope": 0.1}) == r


@pytest.mark.parametrize("name", ["paper_cnn_notebook", "paper_cnn_notebook_relusqr"])
def test_shipped_notebook_checkpoints_match_their_recipes(name):
    if not (SHIPPED / f"{name}.safetensors").is_file():
        pytest.skip("not shipped")
    model, info = se.load_model(name, with_info=True)
    assert Recipe.from_dict(info["recipe"]) == load_recipe(RECIPES / f"{name}.toml")
    assert torch.equal(model.normalize.mean.flatten(), torch.full((3,), 0.5))
    assert torch.equal(model.normalize.std.flatten(), torch.ones(3))
    assert 0.5 < info["metrics"]["test_accuracy"] < 0.65


def test_double_softmax_loss_is_cross_entropy_of_probabilities():
    gen = torch.Generator().manual_seed(0)
    z = 5 * torch.randn(8, 10, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=gen)
    p = z.softmax(1)
    expected = (torch.logsumexp(p, 1) - p[torch.arange(8), y]).mean()  # −log softmax(p)_y
    got = training_loss(z, y, Recipe(loss="double_softmax"))
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    assert got.item() >= math.log(1 + 9 / math.e) - 1e-12  # its floor: p one-hot
    plain = training_loss(z, y, Recipe())
    assert plain.item() == pytest.approx(torch.nn.functional.cross_entropy(z, y).item(), rel=1e-12)
    assert abs(plain.item() - got.item()) > 0.1
    with pytest.raises(RecipeError, match="loss must be one of .*'double_softmax'.*got 'mse'"):
        Recipe(loss="mse")


def test_double_softmax_training_runs_and_saves_a_logit_model(tiny_cifar, tmp_path):
    # the bounded loss has small gradients: a larger lr than TINY's to learn in 3 epochs
    res = train(Recipe(**{**TINY, "loss": "double_softmax", "lr": 1e-2}), data=tiny_cifar,
                out=tmp_path / "m.safetensors", device="cpu", progress=False)
    assert res.history[-1]["test_accuracy"] > 0.6  # chance is 1/3
    x = tiny_cifar.test.float_images()
    logits = se.load_model(res.checkpoint)(x)
    floor = math.log(1 + (logits.shape[1] - 1) / math.e)  # the loss of one-hot probabilities
    # trained on the double softmax: its loss stays above the floor plain cross-entropy goes under
    assert floor - 1e-6 <= res.history[-1]["train_loss"] < floor + 0.2
    assert not torch.allclose(logits.sum(1), torch.ones(len(x)))  # logits, not probabilities
    assert json.loads(res.log_path.read_text())["recipe"]["loss"] == "double_softmax"


def test_lr_schedules():
    r = Recipe(schedule="onecycle", epochs=10, warmup_epochs=2)
    factors = [_lr_factor(r, s, 100, 10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and max(factors) == pytest.approx(1.0)
    assert factors.index(max(factors)) == 20 and factors[-1] == pytest.approx(0.0125)
    c = Recipe(schedule="cosine", epochs=10)
    assert _lr_factor(c, 0, 100, 10) == 1.0 and _lr_factor(c, 50, 100, 10) == pytest.approx(0.5)
    assert _lr_factor(Recipe(), 77, 100, 10) == 1.0


def test_training_learns_and_logs(tiny_cifar, tmp_path):
    seen = []
    res = train(Recipe(**TINY), data=tiny_cifar, out=tmp_path / "m.safetensors", device="cpu",
                progress=False, callbacks=[lambda m, e, metrics: seen.append(e) or metrics.update(extra=e)])
    assert seen == [0, 1, 2]
    assert res.history[-1]["test_accuracy"] > 0.6  # chance is 1/3
    log = json.loads(res.log_path.read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2, 3] and log["epochs"][1]["extra"] == 1
    assert log["recipe"]["lr"] == 3e-3 and log["data_source"] == "synthetic"
    loaded, info = se.load_model(res.checkpoint, with_info=True)
    x = tiny_cifar.test.float_images()
    assert torch.equal(loaded(x), res.model(x))
    assert info["extra"]["complete"] and info["epoch"] == 3


@pytest.mark.parametrize("settings", [
    {"augment": False, "optimizer": "adam"},
    {"augment": True, "optimizer": "adam"},
    {"augment": True, "optimizer": "sgd", "schedule": "cosine", "warmup_epochs": 1.0},
])
def test_resume_matches_uninterrupted_run(tiny_cifar, tmp_path, settings):
    recipe = Recipe(**TINY, **settings)
    full = train(recipe, data=tiny_cifar, out=tmp_path / "full.safetensors", device="cpu", progress=False)

    class Interrupt(Exception):
        pass

    def crash(model, epoch, metrics):  # dies in epoch 3, after epoch 2's checkpoint was written
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(recipe, data=tiny_cifar, out=tmp_path / "cut.safetensors", device="cpu", progress=False,
              callbacks=[crash])
    assert se.load_model(tmp_path / "cut.safetensors", with_info=True)[1]["epoch"] == 2
    resumed = train(recipe, data=tiny_cifar, out=tmp_path / "cut.safetensors", device="cpu",
                    progress=False, resume=True)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [e["epoch"] for e in resumed.history] == [1, 2, 3]


def test_training_leaves_the_global_rng_alone(tiny_cifar, tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    train(Recipe(**{**TINY, "epochs": 1}), data=tiny_cifar, out=tmp_path / "m.safetensors", device="cpu",
          progress=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_resume_refuses_a_checkpoint_without_optimizer_state(tiny_cifar, tmp_path):
    from symensemble.checkpoint import save_checkpoint

    recipe = Recipe(**TINY)
    model = se.create_model(recipe.model, **recipe.model_config())
    out = save_checkpoint(model, tmp_path / "m.safetensors", recipe=recipe.to_dict(), epoch=1,
                          extra={"complete": False})
    with pytest.raises(ValueError, match="lacks optimizer state"):
        train(recipe, data=tiny_cifar, out=out, device="cpu", progress=False, resume=True)


def test_resume_refuses_other_recipe_or_finished_run(tiny_cifar, tmp_path):
    out = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="no checkpoint"):
        train(Recipe(**TINY), data=tiny_cifar, out=out, device="cpu", progress=False, resume=True)
    train(Recipe(**TINY), data=tiny_cifar, out=out, device="cpu", progress=False)
    with pytest.raises(ValueError, match="finished run"):
        train(Recipe(**TINY), data=tiny_cifar, out=out, device="cpu", progress=False, resume=True)
    with pytest.raises(ValueError, match="different recipe"):
        train(Recipe(**{**TINY, "lr": 1e-2}), data=tiny_cifar, out=out, device="cpu", progress=False,
              resume=True)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_other_optimizers_and_schedules(tiny_cifar, tmp_path, optimizer):
    r = Recipe(**{**TINY, "epochs": 2}, optimizer=optimizer, schedule="cosine", warmup_epochs=1.0,
               label_smoothing=0.1, weight_decay=1e-4, augment=True)
    res = train(r, data=tiny_cifar, out=tmp_path / "m.safetensors", device="cpu", progress=False)
    assert len(res.history) == 2 and all(torch.isfinite(p).all() for p in res.model.parameters())


# --- the command line ---------------------------------------------------------------------

def _tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text('model = "paper_cnn"\nhidden = 4\nmodel_kwargs = { channels = 2 }\n'
                    "batch_size = 4\nepochs = 1\nval_size = 2\n")
    return path


def test_cli_train(tmp_path, isolated_cache):
    data = write_image_tree(tmp_path / "data", per_class=4)
    out = tmp_path / "run" / "m.safetensors"
    result = CliRunner().invoke(main, ["train", "--recipe", str(_tiny_recipe(tmp_path)), "--data", str(data),
                                       "--out", str(out), "--seed", "3", "--quiet", "--record-q"])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    _, info = se.load_model(out, with_info=True)
    assert info["recipe"]["seed"] == 3 and info["data_source"].startswith("folder:")
    q = json.loads((tmp_path / "run" / "m.log.json").read_text())["epochs"][0]["q"]
    assert len(q["per_unit"]) == 4 and q["total"] == pytest.approx(sum(q["per_unit"]))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/nowhere"], "accepted layouts"),
        (["--out", "{tmp}/m.pt"], "must end in .safetensors"),
        (["--epochs", "0"], "0 is not in the range"),
        (["--device", "tpu"], "'tpu' is not one of"),
        (["--resume", "--out", "{tmp}/none.safetensors"], "no checkpoint"),
        (["--device", "cuda"], "torch sees no CUDA GPU"),
    ],
)
def test_cli_train_errors(tmp_path, isolated_cache, monkeypatch, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = write_image_tree(tmp_path / "data", per_class=2)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--data" not in args:
        args += ["--data", str(data)]
    result = CliRunner().invoke(main, ["train", "--recipe", str(_tiny_recipe(tmp_path)), "--quiet", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_bad_recipe(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = -1\n")
    result = CliRunner().invoke(main, ["train", "--recipe", str(bad)])
    assert result.exit_code == 2 and "epochs must be >= 1" in result.output
    result = CliRunner().invoke(main, ["train", "--recipe", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.cifar
@pytest.mark.skipif(real_cifar_root() is None, reason="SYMENSEMBLE_DATA has no CIFAR-10")
def test_one_epoch_of_the_paper_recipe(tmp_path):
    out = tmp_path / "paper.safetensors"
    result = CliRunner().invoke(main, ["train", "--recipe", str(RECIPES / "paper_cnn.toml"), "--epochs", "1",
                                       "--data", real_cifar_root(), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    model, info = se.load_model(out, with_info=True)
    assert info["metrics"]["test_accuracy"] >= 0.50


def test_cli_resume_continues_the_q_drift(tmp_path, isolated_cache):
    from symensemble.data import load_cifar10
    from symensemble.diagnostics import QRecorder

    data_dir = write_image_tree(tmp_path / "data", per_class=4)
    recipe_path = _tiny_recipe(tmp_path)
    recipe = load_recipe(recipe_path).replace(epochs=3)
    out = tmp_path / "m.safetensors"

    def crash(model, epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # interrupted during epoch 2, after epoch 1's checkpoint
        train(recipe, data=load_cifar10(data_dir, val_size=recipe.val_size, seed=recipe.split_seed),
              out=out, device="cpu", progress=False, callbacks=[QRecorder(), crash])
    result = CliRunner().invoke(main, ["train", "--recipe", str(recipe_path), "--epochs", "3", "--data",
                                       str(data_dir), "--out", str(out), "--resume", "--record-q", "--quiet"])
    assert result.exit_code == 0, result.output
    epochs = json.loads((tmp_path / "m.log.json").read_text())["epochs"]
    first = epochs[0]["q"]["total"]
    for e in epochs[1:]:
        assert e["q"]["drift"] == pytest.approx(e["q"]["total"] - first, abs=1e-12)
