"""Partition a network's weights into the Hessian blocks that HAWQ scores.

HAWQ treats the Hessian as block diagonal: block ``b`` holds the weights (and biases) of one
``Conv*d``/``Linear`` module (``grouping="layer"``) or of a whole building block of the
architecture, recognised by its class name (:data:`BLOCK_CLASS_NAMES`): a residual block
(``"residual"``), an inverted-residual block (``"inverted_residual"``) or a fire module
(``"fire"``). Its sensitivity comes from ``H_bb`` alone. BatchNorm (and any other
non-Conv/Linear) parameters belong to no block.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.conv import _ConvNd

logger = logging.getLogger(__name__)

BLOCK_CLASS_NAMES: dict[str, frozenset[str]] = {
    # torchvision's ResNet and hawq.models' CIFAR ResNet and SqueezeNext
    "residual": frozenset({"BasicBlock", "Bottleneck", "SqueezeNextBlock"}),
    "inverted_residual": frozenset({"InvertedResidual"}),  # torchvision's MobileNet-V2
    "fire": frozenset({"Fire"}),  # torchvision's SqueezeNet 1.0 / 1.1
}
"""grouping -> the class names of the modules that become one block each."""
GROUPINGS = ("layer", *BLOCK_CLASS_NAMES)


@dataclass(frozen=True, kw_only=True)
class Block:
    """A Hessian block: named group of Conv/Linear modules and their parameters."""

    name: str
    module_names: tuple[str, ...]
    param_names: tuple[str, ...]
    n_params: int

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Block.name must be a non-empty string")
        if not self.param_names:
            raise ValueError(f"Block {self.name!r}: param_names must not be empty")
        if self.n_params <= 0:
            raise ValueError(f"Block {self.name!r}: n_params must be > 0, got {self.n_params}")


def _is_weight_module(module: nn.Module) -> bool:
    return isinstance(module, _ConvNd | nn.Linear)


def _direct_params(prefix: str, module: nn.Module) -> list[tuple[str, int]]:
    return [
        (f"{prefix}.{name}" if prefix else name, p.numel())
        for name, p in module.named_parameters(recurse=False)
    ]


def _block_owner(name: str, owners: list[str]) -> str | None:
    for owner in owners:
        if owner == "" or name == owner or name.startswith(owner + "."):
            return owner
    return None


def _block_owners(model: nn.Module, named: list[tuple[str, nn.Module]], grouping: str) -> list[str]:
    """FQNs of the outermost modules whose class the grouping names (``[]`` for "layer")."""
    if grouping == "layer":
        return []
    classes = BLOCK_CLASS_NAMES[grouping]
    owners: list[str] = []
    for name, module in named:
        if type(module).__name__ in classes and _block_owner(name, owners) is None:
            owners.append(name)
    if not owners:
        present = {type(m).__name__ for _, m in named}
        fits = [g for g, names in BLOCK_CLASS_NAMES.items() if names & present]
        raise ValueError(
            f"grouping {grouping!r} found no {'/'.join(sorted(classes))} module in "
            f"{type(model).__name__}; use grouping 'layer'"
            + (f" or {' / '.join(repr(g) for g in fits)}" if fits else "")
        )
    return owners


def partition_blocks(
    model: nn.Module,
    *,
    grouping: str = "layer",
    patterns: Sequence[tuple[str, str]] | None = None,
) -> list[Block]:
    """Group the model's Conv/Linear modules into blocks, in module order.

    grouping: ``"layer"`` gives one block per Conv/Linear module (named by its FQN); a key of
        :data:`BLOCK_CLASS_NAMES` (``"residual"``: ``BasicBlock``/``Bottleneck``/
        ``SqueezeNextBlock``, ``"inverted_residual"``: ``InvertedResidual``, ``"fire"``:
        ``Fire``) gives one block per module of those classes (outermost wins, named by its
        FQN) holding every Conv/Linear inside it, and one block per remaining Conv/Linear. A
        model without any module of the grouping's classes is a ``ValueError`` naming the
        groupings that would match.
    patterns: ordered ``(regex, block_name)`` pairs tried before ``grouping``; the first regex
        that ``re.fullmatch``-es a Conv/Linear module's FQN assigns it to block
        ``match.expand(block_name)`` (so ``(r"layer(\\d)\\..*", r"stage\\1")`` works). Modules
        that no pattern matches fall back to ``grouping``; a pattern matching no module is a
        ``ValueError`` (typo guard).

    Blocks are ordered by their first module in ``model.named_modules()`` order. Only direct
    parameters of Conv/Linear modules enter blocks (never BatchNorm's); a parameter shared by
    two blocks is a ``ValueError``.
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    compiled: list[tuple[re.Pattern[str], str]] = []
    for i, pair in enumerate(patterns or ()):
        if not (isinstance(pair, Sequence) and len(pair) == 2):
            raise ValueError(f"patterns[{i}] must be a (regex, block_name) pair, got {pair!r}")
        regex, block_name = pair
        try:
            compiled.append((re.compile(regex), block_name))
        except re.error as exc:
            raise ValueError(f"patterns[{i}]: invalid regex {regex!r}: {exc}") from exc

    named = list(model.named_modules())
    owners = _block_owners(model, named, grouping)

    groups: dict[str, list[str]] = {}
    used_patterns: set[int] = set()
    for name, module in named:
        if not _is_weight_module(module) or not _direct_params(name, module):
            continue
        block_name = None
        for i, (regex, template) in enumerate(compiled):
            match = regex.fullmatch(name)
            if match is not None:
                block_name = match.expand(template)
                used_patterns.add(i)
                break
        if block_name is None:
            owner = _block_owner(name, owners)
            block_name = owner if owner else name
        if not block_name:
            raise ValueError(f"module {name!r} maps to an empty block name")
        groups.setdefault(block_name, []).append(name)

    unused = [compiled[i][0].pattern for i in range(len(compiled)) if i not in used_patterns]
    if unused:
        raise ValueError(f"patterns matched no Conv/Linear module: {unused}")
    if not groups:
        raise ValueError(
            f"{type(model).__name__} has no Conv/Linear module with parameters: no blocks"
        )

    modules = dict(named)
    seen: dict[int, tuple[str, str]] = {}
    blocks = []
    for block_name, module_names in groups.items():
        params: list[str] = []
        n_params = 0
        for mname in module_names:
            for (pname, numel), p in zip(
                _direct_params(mname, modules[mname]),
                modules[mname].parameters(recurse=False),
                strict=True,
            ):
                if id(p) in seen and seen[id(p)][1] == block_name:
                    continue  # the same tensor twice in one block counts once
                if id(p) in seen:
                    raise ValueError(
                        f"parameter {pname!r} is shared with {seen[id(p)][0]!r}: "
                        "tied weights cannot sit in two blocks"
                    )
                seen[id(p)] = (pname, block_name)
                params.append(pname)
                n_params += numel
        blocks.append(
            Block(
                name=block_name,
                module_names=tuple(module_names),
                param_names=tuple(params),
                n_params=n_params,
            )
        )
    logger.debug("partitioned %s into %d blocks (%s)", type(model).__name__, len(blocks), grouping)
    return blocks
