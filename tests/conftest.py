"""Shared fixtures: tiny float64 networks with real data paths and dense-Hessian ground truth.

``problem`` is parametrised over three small models (an MLP, a CNN with BatchNorm in eval
mode with non-trivial running statistics, and a residual network built from ``hawq.models``'
CIFAR ``BasicBlock``), each with batches of unequal size. ``dense_block_hessian`` builds the
exact sample-weighted block Hessian with ``torch.func.hessian`` over ``functional_call``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from hawq.models.resnet_cifar import BasicBlock


@pytest.fixture(autouse=True)
def _single_thread():
    """Two shared cores: keep each test on one thread (and results bitwise reproducible)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """sklearn's digits as (N, 1, 8, 8) images in [0, 1], shuffled: 1,400 train, 397 test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


@dataclass
class Problem:
    name: str
    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    batches: list[tuple[Tensor, Tensor]]


def randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            with torch.no_grad():
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))


def tiny_mlp() -> nn.Module:
    """5 -> 7 (tanh) -> 3: two Linear blocks, 42 + 24 parameters."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def tiny_cnn_bn() -> nn.Module:
    """Conv, BN, tanh, Conv (stride 2, dilation 2, 2 groups), BN, ReLU, pool, Linear."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()
    randomise_bn(model, torch.Generator().manual_seed(11))
    return model


class TinyResNet(nn.Module):
    """conv stem -> BN -> ReLU -> CIFAR BasicBlock(4, 4) -> global pool -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(BasicBlock(4, 4))
        self.linear = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer1(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def tiny_residual() -> nn.Module:
    torch.manual_seed(2)
    model = TinyResNet().double()
    randomise_bn(model, torch.Generator().manual_seed(12))
    return model


def make_batches(
    input_shape: Sequence[int], n_classes: int, sizes: Sequence[int], seed: int
) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, *input_shape, generator=gen, dtype=torch.float64),
            torch.randint(0, n_classes, (n,), generator=gen),
        )
        for n in sizes
    ]


PROBLEMS = {
    "mlp": lambda: Problem("mlp", tiny_mlp(), F.cross_entropy, make_batches((5,), 3, (6, 3, 9), 0)),
    "cnn_bn": lambda: Problem(
        "cnn_bn", tiny_cnn_bn(), F.cross_entropy, make_batches((2, 6, 6), 3, (4, 7), 1)
    ),
    "residual": lambda: Problem(
        "residual", tiny_residual(), F.cross_entropy, make_batches((2, 6, 6), 3, (5, 2, 6), 2)
    ),
}


@pytest.fixture(params=sorted(PROBLEMS))
def problem(request) -> Problem:
    """Each tiny network with unequal batches (model in eval mode for the dense reference)."""
    prob = PROBLEMS[request.param]()
    prob.model.eval()
    return prob


GROUPED = [("mlp", "layer"), ("cnn_bn", "layer"), ("residual", "layer"), ("residual", "residual")]


@pytest.fixture(params=GROUPED, ids=[f"{p}-{g}" for p, g in GROUPED])
def grouped(request) -> tuple[Problem, list]:
    """``(problem, blocks)``: each network by layer, and the residual one also by residual block."""
    from hawq.blocks import partition_blocks

    name, grouping = request.param
    prob = PROBLEMS[name]()
    prob.model.eval()
    return prob, partition_blocks(prob.model, grouping=grouping)


@pytest.fixture
def make_problem() -> Callable[[str], Problem]:
    """Factory: ``make_problem("mlp" | "cnn_bn" | "residual")``."""

    def make(name: str) -> Problem:
        prob = PROBLEMS[name]()
        prob.model.eval()
        return prob

    return make


_DENSE_CACHE: dict[tuple, Tensor] = {}


def _fingerprint(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]]) -> tuple:
    state = tuple((k, float(v.double().sum())) for k, v in model.state_dict().items())
    data = tuple((tuple(x.shape), float(x.sum()), float(y.double().sum())) for x, y in batches)
    return (type(model).__name__, state, data)


def dense_block_hessian(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batches: Sequence[tuple[Tensor, Tensor]],
    param_names: Sequence[str],
) -> Tensor:
    """Exact ``(1/N) sum_j n_j d^2 L_j / dW_b^2`` over the named parameters (model in eval).

    Built with ``torch.func.hessian`` over ``functional_call``; cached per (model state, data,
    parameters) for the session, since the same networks recur across test modules.
    """
    key = (_fingerprint(model, batches), loss_fn, tuple(param_names))
    if key in _DENSE_CACHE:
        return _DENSE_CACHE[key]
    params = {k: v.detach() for k, v in model.named_parameters()}
    shapes = [params[n].shape for n in param_names]
    sizes = [params[n].numel() for n in param_names]
    flat0 = torch.cat([params[n].reshape(-1) for n in param_names])
    total = sum(x.shape[0] for x, _ in batches)

    def loss(flat: Tensor) -> Tensor:
        parts = {
            n: p.view(s) for n, p, s in zip(param_names, flat.split(sizes), shapes, strict=True)
        }
        full = {**params, **parts}
        return (
            sum(x.shape[0] * loss_fn(functional_call(model, full, (x,)), y) for x, y in batches)
            / total
        )

    with warnings.catch_warnings():  # functorch's jvp decompositions use torch.jit.script
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        _DENSE_CACHE[key] = torch.func.hessian(loss)(flat0)
    return _DENSE_CACHE[key]


@pytest.fixture(name="dense_block_hessian")
def dense_block_hessian_fixture():
    return dense_block_hessian
