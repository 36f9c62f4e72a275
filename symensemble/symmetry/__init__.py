"""Parameter-space symmetries: activations, linear actions, the nonlinear action, conserved Q."""

from .activations import Activation, create_activation, list_activations

__all__ = ["Activation", "create_activation", "list_activations"]
