"""``symensemble attack --protocol autoattack`` writes RobustBench model-info files (issues 19, 20):
every field of RobustBench's schema, in its folder layout, clean accuracy measured even when
the eps list has no 0, one file per radius."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import symensemble as se
from symensemble.cli import main
from symensemble.robustness.report import MODEL_INFO_FIELDS

from .conftest import synthetic_cifar, tiny_model, write_tree

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
REAL = Path(__file__).parent / "data/robustbench/model_info/cifar10/Linf/Chen2020Adversarial.json"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("aa")
    data = synthetic_cifar(n_train=100, n_test=40)
    ckpt = se.save_checkpoint(tiny_model(data), root / "tiny.safetensors")
    return write_tree(root / "cifar", data), ckpt


def run(world, out: Path, *extra: str):
    data, ckpt = world
    args = ["attack", "--protocol", "autoattack", "--checkpoint", str(ckpt), "--data", str(data),
            "--n", "6", "--transforms", "original,group", "--num-members", "2",
            "--ensemble-eps", "0.1", "--no-sanity", "--no-figures", "--quiet", "--out", str(out),
            *extra]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_autoattack_cli_writes_robustbench_files_for_every_radius(world, tmp_path, monkeypatch):
    monkeypatch.setenv("SYMENSEMBLE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "aa"
    # large radii: AutoAttack's first attack (APGD-CE) breaks every image, so the later ones
    # (APGD-T, FAB-T, Square) have nothing left to try and the test stays fast; the 8/255 file
    # name (no radius in it) is checked in test_report.py
    res = run(world, out, "--eps", "0.25,0.5", "--model-name", "SymEns", "--venue", "ICML 2026")
    assert res.exit_code == 0, res.output
    assert "eps 0 (clean accuracy) added" in res.output  # an eps list without 0 still measures it
    folder = out / "model_info" / "cifar10" / "Linf"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["SymEns_eps0p25.json", "SymEns_eps0p5.json",
                     "SymEns_group_G2_eps0_1_eps0p25.json", "SymEns_group_G2_eps0_1_eps0p5.json"]
    real = json.loads(REAL.read_text())
    records = json.loads((out / "results.json").read_text())["records"]
    clean = next(r for r in records if r["transform"] == "original" and r["eps"] == 0)
    for name in names:
        info = json.loads((folder / name).read_text())
        assert list(info) == list(MODEL_INFO_FIELDS) and set(info) == set(real)
        assert {k: type(v) for k, v in info.items()} == {k: type(v) for k, v in real.items()}
        assert info["venue"] == "ICML 2026" and info["authors"] == "unknown"
        assert "--link, --authors" in info["footnote"]
    base = json.loads((folder / "SymEns_eps0p5.json").read_text())
    assert base["clean_acc"] == f"{100 * clean['accuracy']:.2f}" and base["eps"] == "0.5"
    group = json.loads((folder / "SymEns_group_G2_eps0_1_eps0p25.json").read_text())
    assert "one backbone pass per image, then 2 member heads" in group["footnote"]
