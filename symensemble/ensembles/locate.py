"""Find the symmetry head of any classifier: Z → σ → pooling → Linear, by walking its graph.

``locate_head(model, example_images)`` traces the model with torch.fx (torchvision's
``NodePathTracer``: node names are module paths such as ``layer4.1.add``) and walks back from
the output: the classifier (``nn.Linear``) ← flatten / dropout / view ← global average pooling
(module, functional or ``mean``) ← an elementwise activation σ ← Z. When Z comes from an
``nn.Linear`` and nothing is pooled, the head is dense (V is that Linear). Explicit fallbacks:
``hidden=`` a graph node name, a submodule name (its output is captured by a forward hook,
cloned, which must fire exactly once) or a callable ``x → Z``. The located pieces are checked
on the example images against ``model(x)``; when they disagree the last graph nodes are listed.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..runtime import eval_mode
from ..symmetry.heads import HeadParts
from .block import block_parts, hooked_output
from .calibration import image_batches, model_device
from .wiring import check_parts

__all__ = ["HeadSpec", "locate_head", "model_head_parts"]

log = logging.getLogger(__name__)

_SKIP_MODULES = (nn.Flatten, nn.Dropout, nn.Identity)
_SKIP_METHODS = {"view", "reshape", "flatten", "squeeze", "contiguous"}
_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool1d)
_POOL_FUNCTIONS = {"adaptive_avg_pool2d", "avg_pool2d", "adaptive_avg_pool1d"}
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Mish, nn.Hardswish, nn.Tanh)
_ACT_FUNCTIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "relu6": nn.ReLU6, "mish": nn.Mish,
    "tanh": nn.Tanh, "hardswish": nn.Hardswish,
}  # fmt: skip
_REL_TOL = 1e-4


@dataclass
class HeadSpec:
    """A located head: where Z comes from, σ, the pooling and the classifier (printable).

    Attributes:
        hidden: the graph node / submodule producing Z, or ``"<callable>"``.
        act: σ, as found (a module path or a function name).
        pool: ``avg`` (global average over positions) or ``none``.
        classifier: the ``nn.Linear`` submodule path.
        channels: C, the width the group acts on; spatial: Z's spatial size (``()`` if dense).
        max_error: max |parts(x) − model(x)| / max |model(x)| on the example images.
        parts: the :class:`~symensemble.symmetry.heads.HeadParts` the ensemble uses.
    """

    hidden: str
    act: str
    pool: str
    classifier: str
    channels: int
    spatial: tuple[int, ...]
    max_error: float
    parts: HeadParts = field(repr=False)

    def __str__(self) -> str:
        size = "×".join(map(str, self.spatial)) or "dense"
        return (f"head: Z = {self.hidden} (C = {self.channels}, {size}) → σ = {self.act} → "
                f"pool = {self.pool} → {self.classifier}; reproduces model(x) to {self.max_error:.2g}")


class _NodeOutput(nn.Module):
    """x → the output of one graph node: the model's traced graph cut after that node.

    The graph module holds the model's own submodules (not copies), so the cut follows the
    model's device moves and weight updates.
    """

    def __init__(self, model: nn.Module, node: str) -> None:
        super().__init__()
        traced = _trace(model)
        if traced is None:
            raise ValueError(f"hidden={node!r}: {type(model).__name__} cannot be traced by torch.fx")
        graph, names = traced
        target = next(n for n, q in names.items() if q == node)
        out = next(n for n in graph.nodes if n.op == "output")
        out.args = (target,)
        cut = torch.fx.GraphModule(model, graph)
        cut.graph.eliminate_dead_code()
        cut.recompile()
        self.cut = [cut]  # a list: the model's modules are not registered a second time

    def forward(self, x: Tensor) -> Tensor:
        return self.cut[0](x)


class _HookedOutput(nn.Module):
    """x → a submodule's output, captured (cloned: a later in-place op must not change it) by
    a forward hook that must fire exactly once per model call."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model, self.name, self.module = [model], name, model.get_submodule(name)

    def forward(self, x: Tensor) -> Tensor:
        return hooked_output(self.model[0], self.module, x, clone=True, error=lambda n: (
            f"hidden={self.name!r} ran {n} times in one forward (expected once: a module called "
            "twice, e.g. a shared ReLU, cannot mark Z); pass a graph node name"))


def _trace(model: nn.Module) -> tuple[Any, dict[Any, str]] | None:
    try:
        from torchvision.models.feature_extraction import NodePathTracer

        tracer = NodePathTracer()
        graph = tracer.trace(model)
        return graph, tracer.node_to_qualname
    except Exception:  # noqa: BLE001 - untraceable models fall back to explicit pieces
        return None


def _fname(node: Any) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _module(model: nn.Module, node: Any) -> nn.Module | None:
    return model.get_submodule(node.target) if node.op == "call_module" else None


def _step(node: Any) -> Any:
    return node.args[0]


def _walk(model: nn.Module, graph: Any) -> dict[str, Any]:
    """Walk back from the output: classifier ← skips ← pooling ← σ ← Z (raises if a step fails)."""
    out = next(n for n in graph.nodes if n.op == "output")
    node = out.args[0]
    if not isinstance(_module(model, node), nn.Linear):
        raise LookupError("the output is not produced by an nn.Linear classifier")
    found: dict[str, Any] = {"classifier": node, "pool": "none"}
    node = _step(node)
    while True:
        mod = _module(model, node)
        if isinstance(mod, _SKIP_MODULES) or (node.op == "call_method" and node.target in _SKIP_METHODS) or (
                node.op == "call_function" and _fname(node) == "flatten"):
            node = _step(node)
        elif isinstance(mod, _POOL_MODULES) or (
                node.op == "call_function" and _fname(node) in _POOL_FUNCTIONS) or (
                node.op == "call_method" and node.target == "mean"):
            found["pool"], node = "avg", _step(node)
        else:
            break
    mod = _module(model, node)
    if isinstance(mod, _ACT_MODULES):
        found["act"] = mod
    elif node.op in ("call_function", "call_method") and _fname(node) in _ACT_FUNCTIONS:
        found["act"] = _ACT_FUNCTIONS[_fname(node)]()
    else:
        raise LookupError(f"expected an elementwise activation before the pooling, found {node.name}")
    found["act_node"], found["z"] = node, _step(node)
    return found


def _not_inplace(act: Any) -> Any:
    if isinstance(act, nn.Module) and getattr(act, "inplace", False):
        act = copy.copy(act)
        act.inplace = False
    return act


def _last_nodes(graph: Any, names: dict[Any, str], n: int = 8) -> list[str]:
    nodes = [names.get(x, x.name) for x in graph.nodes if x.op not in ("placeholder", "output")]
    return nodes[-n:]


def _embed_for(model: nn.Module, hidden: Any, z_name: str | None, node_names: set[str]) -> tuple[Any, str]:
    if callable(hidden) and not isinstance(hidden, str):
        return hidden, "<callable>"
    name = z_name if hidden == "auto" else hidden
    if name in node_names:
        return _NodeOutput(model, name), name
    try:
        model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"hidden={name!r} is neither a graph node nor a submodule; graph nodes end with "
                         f"{sorted(node_names)[-8:]}") from None
    return _HookedOutput(model, name), name


def locate_head(model: nn.Module, example_images: Tensor, *, hidden: Any = "auto", act: Any = "auto",
                pool: str = "auto", classifier: Any = "auto") -> HeadSpec:
    """Locate Z → σ → pooling → Linear in ``model`` and check it reproduces ``model(x)``.

    Args:
        model: any classifier taking the images as they are given (e.g. [0, 1]).
        example_images: a few images (N, ...) for the check (uint8 is divided by 255).
        hidden: ``"auto"``, a graph node name (``"layer4.1.add"``), a submodule name (hooked) or a
            callable ``x → Z``.
        act: ``"auto"`` or σ (a module or callable acting elementwise).
        pool: ``"auto"``, ``"avg"`` or ``"none"``.
        classifier: ``"auto"`` or the ``nn.Linear`` submodule (or its name).

    Returns:
        :class:`HeadSpec` (``spec.parts`` is the head).

    Raises:
        ValueError: nothing found or the pieces do not reproduce ``model(x)``: names the last
            graph nodes and asks for ``hidden=`` (and ``act=``, ``classifier=``).
    """
    traced = _trace(model)
    graph, names = traced if traced is not None else (None, {})
    found: dict[str, Any] = {}
    if graph is not None:
        try:
            found = _walk(model, graph)
        except LookupError as err:
            if hidden == "auto":
                raise ValueError(f"could not locate the head of {type(model).__name__} ({err}); the last "
                                 f"graph nodes are {_last_nodes(graph, names)}: pass hidden=<node producing "
                                 "Z>, act=..., classifier=...") from None
    elif hidden == "auto":
        raise ValueError(f"{type(model).__name__} cannot be traced by torch.fx; pass hidden= (a submodule "
                         "name or a callable x → Z), act= and classifier=")
    U = _classifier(model, classifier, found, names)
    sigma = _not_inplace(found.get("act") if act == "auto" else act)
    if sigma is None:
        raise ValueError("act='auto' needs a traceable model; pass act= (e.g. torch.nn.ReLU())")
    z_name = names.get(found["z"]) if "z" in found else None
    embed, z_label = _embed_for(model, hidden, z_name, set(names.values()))
    return _verified(model, example_images, embed, z_label, sigma, pool, U, found, names, graph)


def _classifier(model: nn.Module, classifier: Any, found: dict[str, Any], names: dict[Any, str]) -> nn.Linear:
    if classifier == "auto":
        if "classifier" in found:
            return model.get_submodule(names[found["classifier"]])
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("the model has no nn.Linear classifier; pass classifier=")
        return linears[-1]
    U = model.get_submodule(classifier) if isinstance(classifier, str) else classifier
    if not isinstance(U, nn.Linear):
        raise ValueError(f"classifier must be an nn.Linear, got {type(U).__name__}")
    return U


@torch.no_grad()
def _verified(model: nn.Module, images: Tensor, embed: Any, z_label: str, sigma: Any, pool: str,
              U: nn.Linear, found: dict[str, Any], names: dict[Any, str], graph: Any) -> HeadSpec:
    x = next(image_batches(images[:8], 8))[1].to(model_device(model))
    with eval_mode(model):
        Z = embed(x)
        kind = pool if pool != "auto" else ("avg" if Z.ndim > 2 else "none")
        V = None
        parts = HeadParts(embed, V, sigma, U, pool=kind)
        expected, got = model(x), parts.from_hidden(Z)
    err = float((expected - got).abs().max()) / max(float(expected.abs().max()), 1e-30) \
        if expected.shape == got.shape else float("inf")
    if not err <= _REL_TOL:
        last = _last_nodes(graph, names) if graph is not None else []
        raise ValueError(f"the located head (Z = {z_label}, σ = {sigma}, pool = {kind}, classifier "
                         f"{tuple(U.weight.shape)}) does not reproduce model(x) (relative error {err:.3g}); "
                         f"the last graph nodes are {last}: pass hidden=<the node producing Z>")
    act_label = names.get(found["act_node"], str(sigma)) if "act_node" in found else str(sigma)
    cls_label = names.get(found.get("classifier"), "") or type(U).__name__
    return HeadSpec(z_label, act_label, kind, cls_label, int(Z.shape[1]), tuple(Z.shape[2:]), err, parts)


def model_head_parts(model: nn.Module, images: Tensor | None, hidden: Any, act: Any, pool: str,
                     classifier: Any, transform: str) -> HeadParts:
    """The head ``SymmetryEnsemble.from_model`` wraps: located and checked, or block mode."""
    if images is None:
        raise ValueError("from_model needs calibration_images (a few are used to check the head)")
    if pool == "block":
        parts = block_parts(model, hidden, act, classifier)
    else:
        spec = locate_head(model, images, hidden=hidden, act=act, pool=pool, classifier=classifier)
        log.info("%s", spec)
        parts = spec.parts
    check_parts(model, parts, transform)
    return parts
