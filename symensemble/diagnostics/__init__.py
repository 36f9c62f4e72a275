"""Q diagnostics: the conserved-quantity studies of the paper's App. E–H, and teleportation.

Each study returns a JSON-ready dict (with a ``checks`` entry stating the paper's qualitative
claim and whether the run reproduced it) and has a ``plot_*`` function writing the figure; the
``symensemble q ...`` commands wrap them.

* :func:`q_dynamics` — Figure 3, Proposition E.1 (Q under gradient descent).
* :func:`q_distribution` — Figures 4–5, eq. 46 (Q at initialization).
* :func:`convergence_elementwise`, :func:`convergence_radial` — Figures 6–7, Prop. G.2.
* :func:`hessian_study`, :func:`one_dimensional_example` — Figure 9, Prop. C.3, eq. 83.
* :func:`inspect_model`, :func:`teleport` — Q of a trained head; moving it along its orbit;
  :func:`teleport_checkpoint` — the same from a checkpoint file to a new one (``q teleport``).
* :class:`QRecorder` — training callback recording the head's Q every epoch.
"""

from .callback import QRecorder
from .convergence import convergence_elementwise, convergence_radial, q_controlled_init
from .curvature import flattest_scales, head_hessian_trace
from .distribution import expected_q, q_distribution, sample_q
from .dynamics import q_dynamics
from .hessian import (
    full_hessian,
    hessian_study,
    hutchinson_trace,
    hvp_fn,
    lanczos,
    one_dimensional_example,
)
from .inspection import head_q_summary, inspect_model
from .teleport import unit_scales_for_q
from .teleport_run import TeleportRun, teleport, teleport_checkpoint

__all__ = [
    "QRecorder",
    "convergence_elementwise",
    "convergence_radial",
    "q_controlled_init",
    "expected_q",
    "q_distribution",
    "sample_q",
    "q_dynamics",
    "full_hessian",
    "hessian_study",
    "hutchinson_trace",
    "hvp_fn",
    "lanczos",
    "one_dimensional_example",
    "head_q_summary",
    "inspect_model",
    "flattest_scales",
    "head_hessian_trace",
    "teleport",
    "teleport_checkpoint",
    "TeleportRun",
    "unit_scales_for_q",
]
