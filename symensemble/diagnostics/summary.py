"""Short text summaries of the Q studies' results (what ``symensemble q ...`` prints).

Each function takes the JSON-ready dict a study returns and gives the lines to print, so the
command line and a notebook show the same digest of the same numbers.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "inspect_lines",
    "dynamics_lines",
    "distribution_lines",
    "convergence_lines",
    "hessian_lines",
    "teleport_lines",
]


def inspect_lines(result: dict[str, Any]) -> list[str]:
    """Widths, activation, group, orbit dimension and Q per unit (:func:`inspect_model`)."""
    layer, sym, widths = result["layers"][0], result["symmetry"], result["widths"]
    lines = [
        f"{result['checkpoint']}: head {widths['in_features']} -> {widths['hidden']} -> "
        f"{widths['num_classes']}, sigma={layer['activation']['name']}, group={sym['group']}, "
        f"orbit dim={sym['orbit_dim']}"
    ]
    if layer.get("note"):
        lines.append(f"note: {layer['note']}")
    per_unit = layer["per_unit"]
    if len(per_unit) <= 16:
        detail = "per unit: " + ", ".join(f"{q:.4g}" for q in per_unit)
    else:
        detail = (
            f"per unit ({len(per_unit)}): min {min(per_unit):.4g}, "
            f"mean {sum(per_unit) / len(per_unit):.4g}, max {max(per_unit):.4g} (all in the JSON)"
        )
    lines.append(f"Q total = {layer['total']:.6g}; {detail}")
    return lines


def dynamics_lines(result: dict[str, Any]) -> list[str]:
    """Max |ΔQ̃| and final loss per learning rate; Prop. E.1 (:func:`q_dynamics`)."""
    lines = []
    for name, res in result["results"].items():
        cells = ", ".join(
            f"lr={lr:g}: max|dQ~|={d:.2e} loss={f:.2e}"
            for lr, d, f in zip(res["lr"], res["max_abs_dQ_tilde"], res["final_loss"], strict=True)
        )
        lines.append(f"{name:9s} {cells}")
    if "identity" in result["results"]:
        lin = result["results"]["identity"]
        e1 = lin["prop_e1"]
        lines.append(
            f"Prop. E.1 ({e1['steps_checked']} steps x {len(lin['lr'])} lrs): holds={e1['holds']}, "
            f"max |dQ|/(lr^2|dL/dt|) = {max(e1['max_ratio']):.3f}"
        )
    grows = result["checks"]["grows_with_lr"]
    lines.append("dQ~ grows with lr: " + ", ".join(f"{k}={v}" for k, v in grows.items()))
    return lines


def distribution_lines(result: dict[str, Any]) -> list[str]:
    """Sample mean against E[Q] per configuration (:func:`q_distribution`)."""
    lines = []
    for r in result["results"]:
        paper = "" if r["paper_m_minus_h"] is None else f" (paper m-h = {r['paper_m_minus_h']})"
        lines.append(
            f"{r['init']:8s} {r['activation']:8s} (m,h,n)=({r['m']},{r['h']},{r['n']}): "
            f"mean {r['mean']:9.4f} +- {r['stderr']:.4f}  E[Q] {r['expected']:9.4f}{paper}  "
            f"z={r['z']:+.2f}"
        )
    lines.append(f"all means within 3 standard errors: {result['checks']['all_within_3se']}")
    return lines


def convergence_lines(result: dict[str, Any]) -> list[str]:
    """Steps to converge per target Q (:func:`convergence_radial` or ``_elementwise``)."""
    res = result["results"]
    if "targets" in res:  # radial
        lines = [
            f"Q={q:<6g} steps to converge: {s}  steps/Q: {sq}"
            for q, s, sq in zip(res["targets"], res["steps_to_threshold"], res["steps_per_Q"], strict=True)
        ]
        lines.append("checks: " + ", ".join(f"{k}={v}" for k, v in result["checks"].items()))
        return lines
    lines = []
    for name, r in res.items():
        cells = ", ".join(f"Q={q:g}: {s}" for q, s in zip(r["targets"], r["steps_to_threshold"], strict=True))
        skipped = f" (skipped unreachable: {', '.join(r['skipped'])})" if r["skipped"] else ""
        lines.append(f"{name:9s} [{r['method'][0]}] steps to converge: {cells}{skipped}")
    return lines


def hessian_lines(result: dict[str, Any]) -> list[str]:
    """Near-zero eigenvalues against the orbit dimension per run; eq. 83 (:func:`hessian_study`)."""
    lines = []
    for name, res in result["results"].items():
        for r in res["runs"]:
            zero = "-" if r["near_zero"] is None else r["near_zero"]
            lines.append(
                f"{name:9s} Q={r['Q0']:9.4g} loss={r['final_loss']:.1e} near-zero {zero}/{r['num_params']} "
                f"orbit dim {r['orbit_dim']} (formula {r['orbit_dim_formula']}) top {r['top'][0]:.4g}"
            )
    one = result["one_dimensional"]
    lines.append(
        f"1-D example: eigenvalues 0 and sqrt(Q^2+4) for 1/2(1-UV)^2 (2 sqrt(Q^2+4), eq. 83, "
        f"for (1-UV)^2); max abs error {one['max_abs_err']:.1e}"
    )
    lines.append("checks: " + ", ".join(f"{k}={v}" for k, v in result["checks"].items()))
    return lines


def teleport_lines(report: dict[str, Any]) -> list[str]:
    """Q before/after, flatness and the before/after evaluation (:func:`teleport_checkpoint`)."""
    target = (
        f" (target {report['target']}, error {report['target_abs_error']:.2e})"
        if "target_abs_error" in report
        else ""
    )
    lines = [
        f"{report['mode']}: Q total {report['Q_total_before']:.6g} -> {report['Q_total_after']:.6g}{target}"
    ]
    if "flatness" in report:
        fl = report["flatness"]
        line = f"Hessian trace {fl['trace_before']:.5g} -> {fl['trace_after']:.5g}"
        if "top_after" in fl:
            line += f"; top eigenvalue {fl['top_before']:.5g} -> {fl['top_after']:.5g}"
        lines.append(line)
    ev = report.get("evaluation")
    if ev:
        lines.append(
            f"test loss {ev['before']['loss']:.7f} -> {ev['after']['loss']:.7f} "
            f"(rel {ev['rel_loss_change']:.1e}), accuracy {ev['before']['accuracy']:.4f} -> "
            f"{ev['after']['accuracy']:.4f} (rel {ev['rel_accuracy_change']:.1e})"
        )
    return lines
