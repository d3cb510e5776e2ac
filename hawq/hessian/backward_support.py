"""Double-backward support check: locate the module whose forward cannot be differentiated twice.

Hessian-vector products by double backprop need every op between a block and the loss to
have a differentiable backward. Some do not: ``hardsigmoid_backward`` has no derivative
(``nn.Hardsigmoid``), ``@once_differentiable`` autograd functions refuse a second pass, and
custom backwards that leave autograd (``.detach()``, NumPy) silently drop second-order terms.
When an HVP fails or comes out identically zero, :func:`find_double_backward_failures` replays
one batch with forward hooks that capture each module's inputs, then tests every module in
isolation: with ``s = <module(x), r>`` for a fixed random ``r`` it computes ``g = ds/d(x, W)``
with ``create_graph=True`` and differentiates ``<g, u>`` once more. A module fails when that
second pass raises, or when ``g`` has no autograd graph although it changes when the inputs
are perturbed (a broken backward). Only the innermost failing modules are reported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

logger = logging.getLogger(__name__)


def _capture(store: dict[str, tuple[tuple, dict]], name: str, module, args, kwargs, output):
    if name not in store:
        detach = lambda a: a.detach() if isinstance(a, Tensor) else a  # noqa: E731
        store[name] = (tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()})


def _leaf(value: Any) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.detach().clone().requires_grad_(True)
    return value


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, list | tuple):
        return [t for item in out for t in _tensors(item)]
    return []


def _randn_like(t: Tensor, gen: torch.Generator) -> Tensor:
    return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)


def _first_order(module: nn.Module, params, args, kwargs, leaves, gen_seed: int, create: bool):
    gen = torch.Generator().manual_seed(gen_seed)
    out = functional_call(module, params, args, kwargs)
    outs = [o for o in _tensors(out) if o.is_floating_point() and o.requires_grad]
    if not outs:
        return None
    s = sum((o * _randn_like(o, gen)).sum() for o in outs)
    return torch.autograd.grad(s, leaves, create_graph=create, allow_unused=True)


def _module_failure(module: nn.Module, args: tuple, kwargs: dict, seed: int) -> str | None:
    """Why ``module`` cannot be differentiated twice, or None when it can."""
    params = {k: p.detach().requires_grad_(True) for k, p in module.named_parameters()}
    args = tuple(_leaf(a) for a in args)
    kwargs = {k: _leaf(v) for k, v in kwargs.items()}
    inputs = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.requires_grad]
    leaves = inputs + list(params.values())
    if not leaves:
        return None
    with torch.enable_grad():
        try:
            grads = _first_order(module, params, args, kwargs, leaves, seed, create=True)
        except RuntimeError as exc:  # a first-order failure is not what we are looking for
            logger.debug("support check: first-order backward of %s failed: %s", type(module), exc)
            return None
        if grads is None:
            return None
        with_graph = [g for g in grads if g is not None and g.requires_grad]
        if with_graph:
            gen = torch.Generator().manual_seed(seed + 1)
            try:
                torch.autograd.grad(
                    with_graph,
                    leaves,
                    grad_outputs=[_randn_like(g, gen) for g in with_graph],
                    allow_unused=True,
                )
            except RuntimeError as exc:
                return str(exc).strip().splitlines()[0]
            return None
        if not inputs:
            return None
        # No graph at all: fine if the gradient is constant (a linear module), not otherwise.
        gen = torch.Generator().manual_seed(seed + 2)
        shifted = {id(t): t + 1e-2 * (t.abs().max() + 1) * _randn_like(t, gen) for t in inputs}
        args2 = tuple(shifted.get(id(a), a) if isinstance(a, Tensor) else a for a in args)
        kwargs2 = {
            k: shifted.get(id(v), v) if isinstance(v, Tensor) else v for k, v in kwargs.items()
        }
        leaves2 = [shifted[id(t)] for t in inputs] + list(params.values())
        try:
            grads2 = _first_order(module, params, args2, kwargs2, leaves2, seed, create=False)
        except RuntimeError:
            return None
    for g1, g2 in zip(grads, grads2 or (), strict=False):
        if g1 is not None and g2 is not None and not torch.equal(g1, g2):
            return (
                "its gradient changes with its inputs but carries no autograd graph "
                "(the backward is not differentiable, so second-order terms would be dropped)"
            )
    return None


def find_double_backward_failures(
    model: nn.Module, params: Mapping[str, Tensor], x: Tensor, *, seed: int = 0
) -> list[tuple[str, str, str]]:
    """``(module FQN, class name, reason)`` for each innermost module failing double backward.

    ``params`` is passed to ``functional_call`` for the replay; the root module is named
    ``"<model>"``. Cost: one forward plus one double backward per module (on failure only).
    """
    captured: dict[str, tuple[tuple, dict]] = {}
    modules = dict(model.named_modules())
    handles = [
        m.register_forward_hook(partial(_capture, captured, name), with_kwargs=True)
        for name, m in modules.items()
    ]
    try:
        with torch.no_grad():
            functional_call(model, {k: v.detach() for k, v in params.items()}, (x,))
    finally:
        for h in handles:
            h.remove()
    failing = {}
    for name, (args, kwargs) in captured.items():
        reason = _module_failure(modules[name], args, kwargs, seed)
        if reason is not None:
            failing[name] = reason

    def _inside(inner: str, outer: str) -> bool:
        return inner != outer and (outer == "" or inner.startswith(outer + "."))

    innermost = [n for n in failing if not any(_inside(o, n) for o in failing)]
    return [(n or "<model>", type(modules[n]).__name__, failing[n]) for n in innermost]
