"""Parameter-space symmetries: activations, linear actions, the nonlinear action, conserved Q."""

from .activations import Activation, create_activation, list_activations

__all__ = ["Activation", "create_activation", "list_activations"]

from .conserved import (  # noqa: E402
    TwistedQ,
    angular_momentum,
    conserved_quantities,
    homogeneous_q,
    imbalance,
    orbit_scale_for_target,
    q_m,
)
from .elementwise import elementwise_q  # noqa: E402
from .groups import HiddenGroup  # noqa: E402
from .linear import LinearSymmetry, transform_module  # noqa: E402
from .module_bridge import stack_params  # noqa: E402
from .orbits import orbit_dimension_formula  # noqa: E402
from .stack import StackParams  # noqa: E402

__all__ += [
    "HiddenGroup",
    "LinearSymmetry",
    "StackParams",
    "orbit_dimension_formula",
    "stack_params",
    "transform_module",
    "TwistedQ",
    "angular_momentum",
    "conserved_quantities",
    "elementwise_q",
    "homogeneous_q",
    "imbalance",
    "orbit_scale_for_target",
    "q_m",
]

from .nonlinear import (  # noqa: E402
    R_inverse,
    R_matrix,
    equivariance,
    lipschitz_bound,
    nonlinear_action,
    nonlinear_action_multilayer,
)
from .pi_solver import ActivationFn, PiSolution, pi_matrix  # noqa: E402

__all__ += [
    "R_matrix",
    "R_inverse",
    "equivariance",
    "nonlinear_action",
    "nonlinear_action_multilayer",
    "lipschitz_bound",
    "pi_matrix",
    "PiSolution",
    "ActivationFn",
]
