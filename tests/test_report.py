"""symensemble.robustness.report: markdown/CSV/JSON tables, figures, atomic output files, paper comparison."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from symensemble.robustness.records import (
    ORIGINAL,
    WHITEBOX,
    EvaluationResult,
    Record,
    wilson_interval,
)
from symensemble.robustness.report import (
    RECORD_FIELDS,
    compare_with_paper,
    format_eps,
    load_results,
    markdown_table,
    plot_accuracy,
    plot_delta_heatmap,
    records_csv,
    results_json,
    warnings_text,
    write_results,
)
from symensemble.robustness.report.robustbench import MODEL_INFO_FIELDS, ModelCard

PNG = b"\x89PNG\r\n\x1a\n"


def rec(transform, threat, eps, acc, *, attack="fgsm", steps=1, g=200, e=10.0, n=1000):
    correct = round(acc * n)
    lo, hi = wilson_interval(correct, n)
    base = transform == ORIGINAL
    return Record(transform, threat, attack, eps, steps, correct / n, lo, hi, n, correct,
                  None if base else g, None if base else e)


def fgsm_result(warnings=()) -> EvaluationResult:
    eps = [0.0, 0.003, 0.012]
    records = []
    for k, x in enumerate(eps):
        records.append(rec(ORIGINAL, WHITEBOX, x, 0.6 - 0.2 * k))
        for t in ("group", "ginv"):
            for th in ("transfer", "adaptive", "worst"):
                records.append(rec(t, th, x, 0.55 - 0.1 * k - (0.05 if th != "transfer" else 0)))
    settings = {"transforms": [ORIGINAL, "group", "ginv"], "num_members": [200],
                "ensemble_eps": [10.0], "threat": ["transfer", "adaptive"], "aggregate": "vote",
                "sanity_probes": ["adaptive PGD-10 at eps=64/255"]}
    return EvaluationResult(settings, records, list(warnings))


def sweep_result() -> EvaluationResult:
    members, radii = [10, 20, 40], [20.0, 1.0, 0.1]
    records = [rec(ORIGINAL, WHITEBOX, 0.0, 0.6)]
    for t in ("group", "shuffle"):
        for g in members:
            for e in radii:
                acc = 0.6 - (0.3 if e > 0.5 else 0.0) if t == "group" else 0.1
                records.append(rec(t, "transfer", 0.0, acc, g=g, e=e))
    settings = {"transforms": [ORIGINAL, "group", "shuffle"], "num_members": members,
                "ensemble_eps": radii, "threat": ["transfer"], "aggregate": "vote"}
    return EvaluationResult(settings, records, [])


def test_format_eps():
    assert format_eps(0) == "0"
    assert format_eps(8 / 255) == "8/255"
    assert format_eps(0.003) == "0.003"
    assert format_eps(64 / 255) == "64/255"


def test_markdown_table_rows_transform_by_threat_columns_strength():
    text = markdown_table(fgsm_result())
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == "| transform | threat | eps=0 | eps=0.003 | eps=0.012 |"
    body = lines[2:]
    assert len(body) == 1 + 2 * 3  # original once, 2 ensembles × (2 threats + worst case)
    assert body[0].startswith("| original | white-box | 0.600 | 0.400 | 0.200")
    assert [b.split("|")[1].strip() for b in body] == [
        "original", "group", "group", "group", "ginv", "ginv", "ginv"]
    assert [b.split("|")[2].strip() for b in body[1:4]] == ["transfer", "adaptive", "worst-case"]
    assert "**fgsm** (steps=1)" in text and "Wilson" in text


def test_markdown_table_for_sweeps_and_step_grids():
    text = markdown_table(sweep_result())  # one strength: ensemble eps across the columns
    assert "| transform | threat | G | ens. eps=20 | ens. eps=1 | ens. eps=0.1 |" in text
    assert "| group | transfer | 10 | 0.300 | 0.300 | 0.600 |" in text
    assert "| original | white-box |  | 0.600 | 0.600 | 0.600 |" in text
    records = [rec(ORIGINAL, WHITEBOX, 0.3, a, attack="pgd", steps=s)
               for s, a in [(0, 0.6), (1, 0.1), (2, 0.0)]]
    steps_table = markdown_table(EvaluationResult({"transforms": [ORIGINAL]}, records))
    assert "| steps=0 | steps=1 | steps=2 |" in steps_table and "(eps=0.3)" in steps_table


def test_csv_and_json_carry_every_record():
    result = fgsm_result(warnings=["[gradient-masking] something"])
    rows = list(csv.DictReader(io.StringIO(records_csv(result))))
    assert tuple(rows[0]) == RECORD_FIELDS and len(rows) == len(result.records)
    assert rows[0]["num_members"] == "" and float(rows[0]["accuracy"]) == 0.6
    payload = json.loads(results_json(result))
    assert set(payload) == {"settings", "records", "warnings", "probes"}
    need = {"transform", "threat", "attack", "eps", "steps", "accuracy", "ci_low", "ci_high", "n"}
    assert all(need <= set(r) for r in payload["records"])
    assert payload["warnings"] == ["[gradient-masking] something"]


def test_warnings_text():
    assert warnings_text(fgsm_result()).startswith("Sanity checks: all passed")
    text = warnings_text(fgsm_result(["[large-eps] bad"]))
    assert "1 warning" in text and "[large-eps] bad" in text


def test_write_results_files_are_complete_and_atomic(tmp_path):
    result = fgsm_result()
    written = write_results(result, tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"results.json", "results.csv", "table.md", "accuracy_vs_eps.png"}
    assert set(written) == names
    assert (tmp_path / "out" / "accuracy_vs_eps.png").read_bytes().startswith(PNG)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    again = load_results(tmp_path / "out" / "results.json")
    assert [r.accuracy for r in again.records] == [r.accuracy for r in result.records]
    # sweeps also get the Figure 10 heatmap
    write_results(sweep_result(), tmp_path / "sweep")
    assert (tmp_path / "sweep" / "delta_heatmap.png").read_bytes().startswith(PNG)
    write_results(result, tmp_path / "nofig", figures=False)
    assert not list((tmp_path / "nofig").glob("*.png"))


def test_figures_have_one_panel_per_threat_and_transform():
    fig = plot_accuracy(fgsm_result())
    assert len(fig.axes) == 3
    assert [ax.get_title().split(" ")[0] for ax in fig.axes] == ["transfer", "adaptive",
                                                                  "worst-case"]
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["original (white-box)", "group", "ginv"]
    heat = plot_delta_heatmap(sweep_result())
    panels = [ax for ax in heat.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["group − original", "shuffle − original"]
    image = panels[0].images[0].get_array()
    assert image.shape == (3, 3) and image[0, 0] == pytest.approx(-0.3)  # ε=20 row: degraded
    with pytest.raises(ValueError, match="no base-model record"):
        plot_delta_heatmap(sweep_result(), eps=0.5)


def test_figure_draws_one_line_per_step_count_in_an_eps_by_steps_grid():
    eps, steps = [0.0, 0.03, 0.1], [1, 5]
    records = []
    for n_steps in steps:
        for k, x in enumerate(eps):
            acc = 0.6 - 0.1 * k * n_steps
            records.append(rec(ORIGINAL, WHITEBOX, x, max(acc, 0.0), attack="pgd", steps=n_steps))
            records.append(rec("group", "transfer", x, max(acc + 0.05, 0.0), attack="pgd",
                               steps=n_steps))
    settings = {"transforms": [ORIGINAL, "group"], "num_members": [200], "ensemble_eps": [10.0],
                "threat": ["transfer"], "aggregate": "vote"}
    fig = plot_accuracy(EvaluationResult(settings, records, []))
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"original (white-box) (steps=1)", "original (white-box) (steps=5)",
                          "group (steps=1)", "group (steps=5)"}
    for label, line in lines.items():
        n_steps = 1 if "steps=1" in label else 5
        assert list(line.get_xdata()) == eps, label  # one point per eps: no zig-zag
        transform = ORIGINAL if label.startswith("original") else "group"
        expect = [r.accuracy for r in records if r.transform == transform and r.steps == n_steps]
        assert list(line.get_ydata()) == pytest.approx(expect), label
    # a single step count keeps the plain labels
    fig = plot_accuracy(fgsm_result())
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["original (white-box)", "group", "ginv"]


def test_compare_with_paper_curve_and_grid():
    paper = {"source": "notebook", "eps": [0.0, 0.012],
             "accuracy": {"original": [0.598, 0.028], "group": [0.538, 0.083]}}
    text = compare_with_paper(fgsm_result(), paper)
    assert "| original | white-box | 0.600 / 0.598 | 0.200 / 0.028 |" in text
    assert "| group | transfer | 0.550 / 0.538 | 0.350 / 0.083 |" in text
    assert "| group | adaptive | 0.500 / — |" in text
    assert "| group | worst-case | 0.500 / — |" in text
    grid = {"source": "nb", "num_members": [10, 20], "ensemble_eps": [20.0, 0.1],
            "accuracy": {"original": [[0.5, 0.5], [0.5, 0.5]],
                         "group": [[0.1, 0.2], [0.5, 0.5]]}}
    text = compare_with_paper(sweep_result(), grid)
    assert "| 20 | -0.300 / -0.350 |" in text and "| 0.1 | +0.000 / +0.000 |" in text
    assert compare_with_paper(fgsm_result(), {}) == ""


ROBUSTBENCH = Path(__file__).parent / "data" / "robustbench" / "model_info" / "cifar10" / "Linf"


def autoattack_result(eps=(8 / 255,)) -> EvaluationResult:
    records = [rec(ORIGINAL, WHITEBOX, 0.0, 0.62, attack="autoattack", steps=None),
               rec("group", "adaptive", 0.0, 0.49, attack="autoattack", steps=None)]
    for k, x in enumerate(eps):
        records += [rec(ORIGINAL, WHITEBOX, x, 0.25 - 0.1 * k, attack="autoattack", steps=None),
                    rec("group", "adaptive", x, 0.01, attack="autoattack", steps=None)]
    settings = {"protocol": "autoattack", "attack": ["autoattack"], "eps": [0.0, *eps],
                "threat": ["adaptive"], "transforms": ["original", "group"], "num_members": [200],
                "ensemble_eps": [10.0], "model_name": "paper_cnn", "checkpoint": "x.safetensors",
                "seed": 0}
    return EvaluationResult(settings, records)


def test_autoattack_results_write_robustbench_model_info(tmp_path):
    written = write_results(autoattack_result(), tmp_path / "aa", figures=False)
    folder = tmp_path / "aa" / "model_info" / "cifar10" / "Linf"
    assert {p.name for p in folder.iterdir()} == {"symensemble_original.json",
                                                  "symensemble_group_G200_eps10.json"}
    assert "model_info/cifar10/Linf/symensemble_original.json" in written
    base = json.loads((folder / "symensemble_original.json").read_text())
    assert base["clean_acc"] == "62.00" and base["autoattack_acc"] == "25.00"
    assert base["eps"] == "8/255" and base["dataset"] == "cifar10"
    assert base["number_forward_passes"] == 1 and base["architecture"] == "paper_cnn"
    assert base["authors"] == "unknown" and base["venue"] == "" and base["link"] == ""
    assert "--link, --authors, --venue" in base["footnote"] and "n=1000" in base["footnote"]
    group = json.loads((folder / "symensemble_group_G200_eps10.json").read_text())
    assert group["autoattack_acc"] == "1.00" and "G=200" in group["architecture"]
    assert "one backbone pass per image, then 200 member heads" in group["footnote"]
    # other protocols write no RobustBench files
    result = autoattack_result()
    result.settings["protocol"] = "paper"
    assert not any("model_info" in k for k in
                   write_results(result, tmp_path / "p", figures=False))


def test_model_info_has_the_fields_and_types_of_a_real_robustbench_file(tmp_path):
    """Checked against RobustBench's own Chen2020Adversarial.json (tests/data/robustbench)."""
    real = json.loads((ROBUSTBENCH / "Chen2020Adversarial.json").read_text())
    card = ModelCard(name="SymEns2026", link="https://example.org/paper", authors="A. B, C. D",
                     venue="ICML 2026")
    write_results(autoattack_result(), tmp_path / "aa", figures=False, card=card)
    ours = json.loads((tmp_path / "aa/model_info/cifar10/Linf/SymEns2026.json").read_text())
    assert list(ours) == list(MODEL_INFO_FIELDS)
    assert set(ours) == set(real)  # every field RobustBench's file has, and no other
    assert {k: type(v) for k, v in ours.items()} == {k: type(v) for k, v in real.items()}
    assert ours["name"] == "SymEns2026" and ours["venue"] == "ICML 2026"
    assert ours["authors"] == "A. B, C. D" and ours["link"] == "https://example.org/paper"
    # what RobustBench's leaderboard code does with a file: float() of the accuracies
    for info in (real, ours):
        assert 0 <= float(info["clean_acc"]) <= 100 and 0 <= float(info["autoattack_acc"]) <= 100
        assert info["eps"] == "8/255" and info["dataset"] == "cifar10"
    assert (tmp_path / "aa/model_info/cifar10/Linf/SymEns2026_group_G200_eps10.json").is_file()


def test_two_radii_write_two_model_info_files(tmp_path):
    write_results(autoattack_result(eps=(4 / 255, 8 / 255)), tmp_path / "aa", figures=False)
    folder = tmp_path / "aa" / "model_info" / "cifar10" / "Linf"
    names = {p.name for p in folder.iterdir()}
    assert names == {"symensemble_original.json", "symensemble_original_eps4-255.json",
                     "symensemble_group_G200_eps10.json", "symensemble_group_G200_eps10_eps4-255.json"}
    at4 = json.loads((folder / "symensemble_original_eps4-255.json").read_text())
    at8 = json.loads((folder / "symensemble_original.json").read_text())
    assert (at4["eps"], at4["autoattack_acc"]) == ("4/255", "25.00")
    assert (at8["eps"], at8["autoattack_acc"]) == ("8/255", "15.00")


def test_portfolio_tables_show_the_cascade():
    def prow(threat, correct, broken=None, eps=0.03):
        lo, hi = wilson_interval(correct, 100)
        return Record("group", threat, "portfolio", eps, None, correct / 100, lo, hi, 100, correct,
                      200, 10.0, None, broken)

    records = [prow("robust", 60, eps=0.0), prow("clean", 60), prow("pgd-transfer", 30, 30),
               prow("apgd-ce", 20, 10), prow("robust", 20)]
    result = EvaluationResult({"protocol": "portfolio", "transforms": ["original", "group"],
                               "num_members": [200], "ensemble_eps": [10.0]}, records)
    from symensemble.robustness.report import portfolio_table

    table = portfolio_table(result)
    assert "| group (G=200, ε=10) | 0.03 | 0.600 | 0.300 (30) | 0.200 (10) | 0.200 [" in table
    head = markdown_table(result)
    assert "| group | robust |" in head and "pgd-transfer" not in head
    assert result.accuracy("group", eps=0.03) == 0.2
