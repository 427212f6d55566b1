"""How an op finds its layer again: vLLM's ``LayerName`` and the overlay's layer registry.

A layer goes into a custom op as vLLM's ``LayerName`` opaque value where vLLM has it (hoisted
to a graph input, so one compiled graph serves every layer), and comes out of vLLM's forward
context, or of the weak registry below for modules vLLM does not keep there (the legacy
DeepSeek ``Indexer``; tests and benchmarks). Such a site's class registers each instance as
its ``__init__`` returns (:func:`register_instances`): whatever loader builds the model, and
before a compiled graph cached on disk is loaded without tracing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

_layers: "weakref.WeakValueDictionary[str, torch.nn.Module]" = weakref.WeakValueDictionary()

try:  # every vLLM from 0.20 has it (opaque and hoisted where its torch allows)
    from vllm.utils.torch_utils import LayerNameType, _encode_layer_name, _resolve_layer_name
except ImportError:  # older vLLM: a plain string (one graph per layer; nothing better exists)
    LayerNameType = str  # type: ignore[misc]

    def _encode_layer_name(layer_name: str) -> str:
        return layer_name

    def _resolve_layer_name(layer_name: str) -> str:
        return layer_name


encode_layer_name = _encode_layer_name

try:
    from vllm.forward_context import get_forward_context, is_forward_context_available
except ImportError:  # pragma: no cover - every supported vLLM has it

    def is_forward_context_available() -> bool:
        return False


def register_layer(name: str, layer: torch.nn.Module) -> None:
    """Make ``layer`` findable by name outside a vLLM forward context."""
    _layers[name] = layer
    layer.__dict__[REGISTERED] = True


# Set on a layer the registry holds: a plain attribute the rewritten code reads while tracing
# (its value is the same for every registered layer, so no per-layer guard or graph).
REGISTERED = "_vllm_overlap_registered"


def is_registered(layer: torch.nn.Module) -> bool:
    return bool(getattr(layer, REGISTERED, False))


@torch.compiler.assume_constant_result
def warn_unregistered(site_id: str, name: str) -> bool:
    """Say (once per trace) that a site's layer is not in the registry; run at trace time."""
    from vllm_overlap.log import logger

    logger().warning(
        "vllm-overlap %s: layer %s is not in the overlay's registry; it runs upstream's "
        "statements", site_id, name,
    )
    return True


_registering: "weakref.WeakSet[type]" = weakref.WeakSet()  # classes whose __init__ registers


def register_instances(cls: type, name_of: Callable[[Any], str]) -> None:
    """Register every instance of ``cls`` built from now on under ``name_of(instance)``, as its
    ``__init__`` returns (once per class; never raises into vLLM's model construction)."""
    from vllm_overlap.runtime import hooks

    if "__init__" not in vars(cls) or cls in _registering:
        return

    def registering(result, instance, args, kwargs):
        register_layer(name_of(instance), instance)  # a failure: logged; the site runs serially then
        return result

    hooks.wrap(cls, "__init__", after=registering, what=f"registering each {cls.__name__}")
    _registering.add(cls)


def naming(site_id: str, attribute: str) -> Callable[[Any], str]:
    """A ``name_of`` for :func:`register_instances` where the layer has no name of its own (a
    user site's): ``<site id>.<n>`` in construction order (the same on every rank and in
    every process that builds the same model), kept on the instance under ``attribute``."""
    counter = iter(range(1 << 62))

    def name_of(instance) -> str:
        name = instance.__dict__.get(attribute)
        if name is None:
            name = instance.__dict__[attribute] = f"{site_id}.{next(counter)}"
        return name

    return name_of


def registered_layers() -> dict[str, torch.nn.Module]:
    """What the registry holds now (a copy)."""
    return dict(_layers)


def forget_layers() -> None:
    """Empty the registry (tests)."""
    _layers.clear()


def resolve_layer(layer_name: Any) -> Any:
    """The module behind a ``LayerName`` (or str), from vLLM's forward context first."""
    name = _resolve_layer_name(layer_name)
    if is_forward_context_available():
        layer = get_forward_context().no_compile_layers.get(name)
        if layer is not None:
            return layer
    layer = _layers.get(name)
    if layer is None:
        raise KeyError(f"vllm-overlap: no layer named {name!r} in the forward context")
    return layer


def per_rank_width(value: Any) -> int:
    """An output width from the outputs spec: an int, or a vLLM linear layer's per-rank output
    size set at init (``ReplicatedLinear`` has no partition), never its (repackable) weight."""
    if isinstance(value, int):
        return value
    width = getattr(value, "output_size_per_partition", None)
    return value.output_size if width is None else width
