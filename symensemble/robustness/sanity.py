"""Sanity checks of an evaluation: signs of a broken or gradient-masked attack.

:func:`sanity_checks` reads the measured records (and the extra probes the evaluation ran)
and returns readable warnings. The ``LARGE_EPS*`` constants define the large-radius PGD probe
that :func:`symensemble.evaluate` runs for check 4.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .records import WHITEBOX, Record, format_eps

__all__ = ["sanity_checks", "portfolio_checks", "LARGE_EPS", "LARGE_EPS_MAX_ACCURACY", "LARGE_EPS_STEPS"]

#: Radius of the sanity probe at which an adaptive PGD should leave about 0 accuracy.
LARGE_EPS = 64 / 255
#: Accuracy above which the large-eps probe warns.
LARGE_EPS_MAX_ACCURACY = 0.05
#: PGD steps of the large-eps probe.
LARGE_EPS_STEPS = 10


def _significantly_greater(hi: Record, lo: Record, z: float, tol: float) -> bool:
    """Whether ``hi.accuracy`` exceeds ``lo.accuracy`` by more than ``tol`` and ``z`` std errors."""
    diff = hi.accuracy - lo.accuracy
    if diff <= tol:
        return False
    pooled = (hi.correct + lo.correct) / max(hi.n + lo.n, 1)
    se = math.sqrt(max(pooled * (1 - pooled), 0.0) * (1 / max(hi.n, 1) + 1 / max(lo.n, 1)))
    return se == 0.0 or diff / se > z


def _label(r: Record) -> str:
    who = r.transform if r.num_members is None else (
        f"{r.transform} (G={r.num_members}, ensemble eps={r.ensemble_eps:g})")
    steps = "" if r.steps is None else f", steps={r.steps}"
    return f"{who} / {r.threat} / {r.attack}{steps}"


def sanity_checks(
    records: Sequence[Record],
    probes: Sequence[Record] = (),
    *,
    z: float = 3.0,
    tol: float = 0.01,
    large_eps_max_accuracy: float = LARGE_EPS_MAX_ACCURACY,
    num_classes: int = 10,
    config: Any = None,
) -> list[str]:
    """Signs of a broken or gradient-masked evaluation, as readable warnings.

    Checks (each difference must exceed ``tol`` and ``z`` standard errors, so sampling noise
    does not trigger them). Targets whose clean accuracy is at chance (1/num_classes, within
    the same margin) are skipped: a (nearly) constant classifier keeps its class share under
    any attack, so its rows say nothing about the attack.

    1. ``[non-monotonic]`` accuracy rising with eps (at fixed steps) or with steps (at fixed eps).
    2. ``[iterative-weaker]`` an iterative attack leaving more accuracy than single-step FGSM
       at the same eps.
    3. ``[gradient-masking]`` the adaptive attack leaving more accuracy than the transfer
       attack at the same strength: the ensemble's own gradients are less useful than a
       surrogate's.
    4. ``[large-eps]`` adaptive PGD at eps = 64/255 leaving more than
       ``large_eps_max_accuracy``: at that radius any real classifier is broken.

    5. ``[weak-attack]`` (protocol ``paper``) the strongest attack at a radius is single-step
       or short: the accuracy is an upper bound, not a robustness claim.
    6. Portfolio cascades (:func:`portfolio_checks`): ``[not-converged]`` the last gradient
       attack still breaks many images; ``[square-beats-gradients]`` the gradient-free Square
       attack breaks images every gradient attack missed.
    7. ``[binarization]`` (needs the targets and images, so it is not run here:
       :func:`symensemble.robustness.binarization.binarization_checks`) the attack fails a
       binarized task with a guaranteed adversarial example (Zimmermann et al. 2022).

    Args:
        records: the requested measurements.
        probes: extra measurements (large-eps PGD, FGSM references).
        z: standard errors a difference must exceed.
        tol: absolute accuracy difference a finding must exceed.
        large_eps_max_accuracy: threshold of check 4.
        num_classes: C; chance accuracy is 1/C.
        config: the run's :class:`~symensemble.robustness.config.EvalConfig` (for check 5), if any.

    Returns:
        Warning strings (empty when all checks pass).
    """
    skip = _at_chance(list(records) + list(probes), num_classes, z, tol)
    grid = [r for r in records if _who(r) not in skip]
    everything = grid + [r for r in probes if _who(r) not in skip]
    warnings = _non_monotonic(grid, z, tol)
    warnings += _iterative_weaker(grid, everything, z, tol)
    warnings += _adaptive_weaker(everything, z, tol)
    if config is not None and getattr(config, "protocol", None) == "paper":
        warnings += _weak_attack(grid)
    warnings += portfolio_checks(grid, z=z, tol=tol)
    warnings += _large_eps(everything, large_eps_max_accuracy)
    return warnings


def _who(r: Record) -> tuple:
    return (r.transform, r.num_members, r.ensemble_eps)


def _at_chance(rows: Sequence[Record], num_classes: int, z: float, tol: float) -> set[tuple]:
    """Targets whose clean accuracy is at chance: (nearly) constant classifiers keep their
    class share under any attack, so their rows carry no signal about the attack."""
    chance = 1.0 / max(num_classes, 1)
    out = set()
    for r in rows:
        if r.eps == 0 or r.steps == 0:
            se = math.sqrt(chance * (1 - chance) / max(r.n, 1))
            if r.accuracy <= chance + max(tol, z * se):
                out.add(_who(r))
    return out


def _non_monotonic(grid: Sequence[Record], z: float, tol: float) -> list[str]:
    """Check 1: accuracy rising with eps (at fixed steps) or with steps (at fixed eps)."""
    warnings = []
    for vary, fixed in (("eps", "steps"), ("steps", "eps")):
        series: dict[tuple, list[Record]] = defaultdict(list)
        for r in grid:
            if vary == "steps" and r.steps is None:
                continue
            key = (r.attack, r.transform, r.threat, r.num_members, r.ensemble_eps,
                   getattr(r, fixed))
            series[key].append(r)
        for points in series.values():
            points.sort(key=lambda r: getattr(r, vary))
            lowest = points[0]
            for r in points[1:]:
                if _significantly_greater(r, lowest, z, tol):
                    warnings.append(
                        f"[non-monotonic] {_label(r)}: accuracy rises from {lowest.accuracy:.3f} "
                        f"at {vary}={getattr(lowest, vary):g} to {r.accuracy:.3f} at "
                        f"{vary}={getattr(r, vary):g}; a stronger attack should not help the "
                        "model (gradient masking, or a too large/small step size)"
                    )
                    break
                if r.accuracy < lowest.accuracy:
                    lowest = r
    return warnings


def _iterative_weaker(grid: Sequence[Record], everything: Sequence[Record], z: float,
                      tol: float) -> list[str]:
    """Check 2: an iterative attack weaker than single-step FGSM at the same eps."""
    fgsm = {(r.transform, r.threat, r.num_members, r.ensemble_eps, r.eps): r
            for r in everything if r.attack == "fgsm" and r.eps > 0}
    warnings = []
    for r in grid:
        if r.attack in ("fgsm", "portfolio") or r.eps == 0 or r.steps == 0:
            continue
        ref = fgsm.get((r.transform, r.threat, r.num_members, r.ensemble_eps, r.eps))
        if ref is not None and _significantly_greater(r, ref, z, tol):
            warnings.append(
                f"[iterative-weaker] {_label(r)} at eps={format_eps(r.eps)} leaves {r.accuracy:.3f} "
                f"accuracy but single-step FGSM leaves {ref.accuracy:.3f}; an iterative attack "
                "should be at least as strong (too small a step size, too few steps, or "
                "gradient masking)"
            )
    return warnings


def _adaptive_weaker(everything: Sequence[Record], z: float, tol: float) -> list[str]:
    """Check 3: the adaptive attack weaker than the transfer attack at the same strength."""
    transfer = {(r.attack, r.transform, r.num_members, r.ensemble_eps, r.eps, r.steps): r
                for r in everything if r.threat == "transfer"}
    warnings = []
    for r in everything:
        if r.threat != "adaptive" or r.eps == 0 or r.steps == 0:
            continue
        ref = transfer.get((r.attack, r.transform, r.num_members, r.ensemble_eps, r.eps, r.steps))
        if ref is not None and _significantly_greater(r, ref, z, tol):
            warnings.append(
                f"[gradient-masking] {_label(r)} at eps={format_eps(r.eps)} leaves {r.accuracy:.3f} "
                f"accuracy, more than the transfer attack from the base model "
                f"({ref.accuracy:.3f}); the ensemble's own gradients are less useful than a "
                "surrogate's — do not trust the adaptive number as a robustness claim"
            )
    return warnings


def _large_eps(everything: Sequence[Record], max_accuracy: float) -> list[str]:
    """Check 4: PGD at a large eps must break the model."""
    return [
        f"[large-eps] {_label(r)} at eps={format_eps(r.eps)} leaves {r.accuracy:.3f} "
        f"accuracy (expected about 0, at most {max_accuracy:g}); the attack "
        "does not work on this model — gradient masking or a broken pipeline"
        for r in everything
        if (r.attack == "pgd" and abs(r.eps - LARGE_EPS) < 1e-9
            and r.threat in ("adaptive", WHITEBOX) and r.accuracy > max_accuracy)
    ]


#: Iterations below which an attack is "short" for check 5.
SHORT_ATTACK_STEPS = 20


def _weak_attack(records: Sequence[Record]) -> list[str]:
    """Check 5: radii whose strongest attack is single-step or short."""
    strongest: dict[float, int] = {}
    for r in records:
        if r.eps > 0 and r.steps != 0:
            steps = SHORT_ATTACK_STEPS if r.attack.startswith("autoattack") else (r.steps or 1)
            strongest[r.eps] = max(strongest.get(r.eps, 0), steps)
    out = []
    for eps, steps in sorted(strongest.items()):
        if steps < SHORT_ATTACK_STEPS:
            kind = "single-step FGSM" if steps <= 1 else f"{steps}-step"
            out.append(
                f"[weak-attack] at eps={format_eps(eps)} the strongest attack is {kind}: these "
                "accuracies are upper bounds, not robustness claims (the default portfolio "
                "protocol runs 100-step APGD, transfer PGD and a vote surrogate)")
    return out


def _drop_is_significant(before: int, broken: int, n: int, z: float, tol: float) -> bool:
    """Whether ``broken`` of ``before`` robust images (of n) is more than tol and z std errors."""
    if n <= 0 or broken / n <= tol:
        return False
    p = before / n
    se = math.sqrt(max(p * (1 - p), 0.0) / n)
    return se == 0.0 or broken / n > z * se


def portfolio_checks(records: Sequence[Record], *, z: float = 3.0, tol: float = 0.01) -> list[str]:
    """Check 6 on portfolio rows (``attack == "portfolio"``, one per cascade stage).

    * ``[not-converged]``: the last gradient attack of the cascade still breaks more than
      ``tol`` and ``z`` standard errors of the images every earlier attack left robust: more
      iterations or restarts would likely lower the number further.
    * ``[square-beats-gradients]``: the gradient-free Square attack breaks images that every
      gradient attack left robust (AutoAttack's own check).

    (Transfer attacks run first, so their rows say nothing about masking here; the paper
    grid's ``[gradient-masking]`` check and the large-eps probe cover it.)
    """
    from .attacks.portfolio import GRADIENT_FREE, TRANSFER

    stages: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        if r.attack == "portfolio" and r.eps > 0 and r.threat != "robust":
            stages[(r.transform, r.num_members, r.ensemble_eps, r.eps)].append(r)
    out = []
    for rows in stages.values():
        gradient = [r for r in rows[1:] if r.threat not in TRANSFER + GRADIENT_FREE]
        survivors = rows[0].correct  # the clean-correct images the cascade starts from
        for r in rows[1:]:
            broken = r.broken or 0
            kind = ("square-beats-gradients" if r.threat in GRADIENT_FREE else
                    "not-converged" if gradient and r is gradient[-1] else None)
            if kind and _drop_is_significant(survivors, broken, r.n, z, tol):
                out.append(f"[{kind}] {_label(r)} at eps={format_eps(r.eps)} broke {broken} of "
                           f"{r.n} images " + _WHY[kind])
            survivors -= broken
    return out


_WHY = {
    "not-converged": "that every earlier attack left robust: the cascade has not converged; "
                     "raise --apgd-steps or --restarts",
    "square-beats-gradients": "that every gradient attack left robust (AutoAttack's check): "
                              "gradients are masked; trust only the combined robust row",
}
