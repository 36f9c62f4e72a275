"""symensemble.models.foreign: classifiers from timm, torchvision or any factory, by spec."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from symensemble.models.foreign import ModelSpecError, load_foreign_model, parse_normalization


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    """A factory for the ``package.module:factory`` spec: conv → ReLU → pool → Linear."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, num_classes))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_torchvision_weights_round_trip(tmp_path, images, suffix) -> None:
    import torchvision

    torch.manual_seed(1)
    net = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if suffix == ".pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        save_file(state, str(path))
    model = load_foreign_model("torchvision:resnet18", weights=path, num_classes=10)
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(images), net(images))


def test_timm_and_factory_specs(images) -> None:
    model = load_foreign_model("timm:resnet18", num_classes=7)
    assert model(images).shape == (2, 7)
    model = load_foreign_model(f"{__name__}:tiny_cnn", num_classes=4)
    assert model(images).shape == (2, 4)


def test_normalization_is_the_first_layer(images) -> None:
    model = load_foreign_model(f"{__name__}:tiny_cnn", normalize="cifar10")
    mean, std = parse_normalization("cifar10")
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(images), model.model((images - m) / s), atol=1e-6)
    assert parse_normalization("0.5,0.5,0.5/0.25,0.25,0.25") == ((0.5,) * 3, (0.25,) * 3)
    assert parse_normalization("none") is None


@pytest.mark.parametrize("spec, match", [
    ("resnet18", "expected 'timm:NAME'"),
    ("timm:no_such_net", "timm has no model"),
    ("torchvision:no_such_net", "torchvision has no model"),
    ("no_such_package_xyz:factory", "cannot import"),
    (f"{__name__}:no_such_factory", "no callable"),
])
def test_bad_specs_are_named(spec, match) -> None:
    with pytest.raises(ModelSpecError, match=match):
        load_foreign_model(spec)


def test_bad_weights_are_named(tmp_path) -> None:
    path = tmp_path / "w.pt"
    torch.save(tiny_cnn(10).state_dict(), path)
    with pytest.raises(ModelSpecError, match="do not fit the model.*shape mismatch"):
        load_foreign_model(f"{__name__}:tiny_cnn", weights=path, num_classes=3)
    pickled = tmp_path / "obj.pt"
    torch.save({"state_dict": tiny_cnn(10)}, pickled)  # a whole pickled module, not weights
    with pytest.raises(ModelSpecError, match="weights_only"):
        load_foreign_model(f"{__name__}:tiny_cnn", weights=pickled)
    with pytest.raises(ModelSpecError, match="unknown suffix"):
        load_foreign_model(f"{__name__}:tiny_cnn", weights=_touch(tmp_path / "w.npz"))
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_foreign_model(f"{__name__}:tiny_cnn", weights=tmp_path / "missing.pt")
    with pytest.raises(ModelSpecError, match="normalization"):
        load_foreign_model(f"{__name__}:tiny_cnn", normalize="cifar100")


def _touch(path):
    path.write_bytes(b"x")
    return path


def test_robustbench_spec_without_the_package_says_what_to_install() -> None:
    try:
        import robustbench  # noqa: F401
    except ImportError:
        with pytest.raises(ModelSpecError, match="pip install robustbench"):
            load_foreign_model("robustbench:Standard")
    else:
        pytest.skip("robustbench is installed; its loader needs weights in a local model_dir")
