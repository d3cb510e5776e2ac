"""Building first-order graphs whose double backward does no wasted work.

* :class:`SavedBytes` is a ``saved_tensors_hooks`` pair that adds up the distinct storages a
  graph keeps alive (activations saved by the forward and by the create-graph backward),
  which is what caching that graph costs in memory.
* :class:`LeanSecondOrder` is a ``TorchFunctionMode`` active while a first-order graph is
  built. It changes no value, only how the ops differentiate twice:

  - ``F.batch_norm(..., training=False)`` becomes ``x * s + t`` with ``s = w / sqrt(var +
    eps)``, ``t = b - mean * s`` per channel. Eval BatchNorm *is* this affine map, but
    PyTorch's backward-of-backward for it (``batchnorm_double_backward``) is a generic
    training-mode formula costing about as much as a convolution per layer; the affine
    form's is one elementwise multiply.
  - ``F.conv1d/2d/3d`` (numeric padding) become :class:`_Conv`, whose backward is written
    with differentiable ops: ``dx = conv_transpose(dy, w)`` and ``dw`` by
    :class:`_ConvWeightGrad`. PyTorch's own ``_convolution_double_backward`` ignores which
    outputs are needed: through every layer between a block and the loss it also computes
    a weight gradient (``conv(ggI, gO)``, a slow large-kernel convolution), and at the block
    itself an input gradient. With these, the double backward does ``conv(ggI, w)`` per
    later layer and ``conv(x, v)`` at the block, nothing else.

Results agree with the native ops to rounding (the tests compare against dense Hessians of
the unmodified model).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


class SavedBytes:
    """Counts the bytes of distinct storages saved for backward, excluding ``exclude``'s."""

    def __init__(self, exclude: Iterable[Tensor]) -> None:
        self.seen = {t.untyped_storage().data_ptr() for t in exclude}
        self.nbytes = 0

    def pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.nbytes += storage.nbytes()
        return t

    @staticmethod
    def unpack(t: Tensor) -> Tensor:
        return t

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def _tuple(value, d: int) -> list[int]:
    return list(value) if isinstance(value, list | tuple) else [int(value)] * d


def _input_grad(gy: Tensor, w: Tensor, x_shape, stride, padding, dilation, groups) -> Tensor:
    """``d<y, gy>/dx`` for ``y = conv(x, w)``: a transposed convolution (differentiable)."""
    d = gy.dim() - 2
    out_pad = []
    for i in range(d):
        natural = (gy.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
        natural += dilation[i] * (w.shape[2 + i] - 1) + 1
        out_pad.append(x_shape[2 + i] - natural)
    return torch.convolution(gy, w, None, stride, padding, dilation, True, out_pad, groups)


def _will_use(ctx, i: int, wanted: set[int] | None, tensor_id: int | None = None) -> bool:
    """Whether the running backward needs the gradient of input ``i`` of this node.

    ``ctx.needs_input_grad`` only says the input requires grad. A leaf's gradient is needed
    iff it is among the ``wanted`` leaves (the inputs of the current ``autograd.grad``, set
    by the operator; ``None``: all). For a non-leaf, ask the engine whether the node that
    the gradient flows into will run (private API, so any failure means "needed").
    """
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[i][0]
    if node is None:
        return False
    if type(node).__name__ == "AccumulateGrad":
        return wanted is None or tensor_id in wanted
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True


class _ConvWeightGrad(torch.autograd.Function):
    """``dw = d<conv(x, w), gy>/dw`` (mkldnn weight gradient) with a lean backward."""

    @staticmethod
    def forward(ctx, gy, x, w, conf, mode):
        ctx.save_for_backward(gy, x)
        ctx.conf, ctx.mode = conf, mode
        stride, padding, dilation, groups = conf
        return torch.ops.aten.convolution_backward(
            gy, x, w, None, stride, padding, dilation, False, [0] * (x.dim() - 2), groups,
            [False, True, False],
        )[1]  # fmt: skip

    @staticmethod
    def backward(ctx, gw):
        gy, x = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        d_gy = d_x = None
        if _will_use(ctx, 0, ctx.mode.wanted):
            d_gy = torch.convolution(
                x, gw, None, stride, padding, dilation, False, [0] * (x.dim() - 2), groups
            )
        if _will_use(ctx, 1, ctx.mode.wanted, id(x)):
            d_x = _input_grad(gy, gw, x.shape, stride, padding, dilation, groups)
        return d_gy, d_x, None, None, None


class _Conv(torch.autograd.Function):
    """``conv(x, w, b)`` whose backward is built from differentiable, mask-aware ops."""

    @staticmethod
    def forward(ctx, x, w, b, conf, mode):
        ctx.save_for_backward(x, w)
        ctx.conf, ctx.mode = conf, mode
        ctx.ids = (id(x), id(w), id(b))
        stride, padding, dilation, groups = conf
        return torch.convolution(
            x, w, b, stride, padding, dilation, False, [0] * (x.dim() - 2), groups
        )

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        wanted = ctx.mode.wanted
        dx = dw = db = None
        if _will_use(ctx, 0, wanted, ctx.ids[0]):
            dx = _input_grad(gy, w, x.shape, stride, padding, dilation, groups)
        if _will_use(ctx, 1, wanted, ctx.ids[1]):
            dw = _ConvWeightGrad.apply(gy, x, w.detach(), ctx.conf, ctx.mode)
        if _will_use(ctx, 2, wanted, ctx.ids[2]):
            db = gy.sum(dim=[0, *range(2, gy.dim())])
        return dx, dw, db, None, None


_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


class LeanSecondOrder(TorchFunctionMode):
    """Eval BatchNorm as affine and convolutions with lean double backward (see module doc).

    ``wanted`` holds the ids of the leaf tensors whose gradients the running backward
    computes (``None``: every leaf that requires grad); the operator sets it before each
    ``autograd.grad`` so that backward nodes skip weight gradients nobody asked for.
    """

    def __init__(self) -> None:
        super().__init__()
        self.wanted: set[int] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONVS:
            d = _CONVS[func]
            bound = {**_CONV_DEFAULTS, **dict(zip(_CONV_ARGS, args, strict=False)), **kwargs}
            x, padding = bound["input"], bound["padding"]
            if isinstance(x, Tensor) and x.dim() == d + 2 and not isinstance(padding, str):
                conf = (
                    _tuple(bound["stride"], d), _tuple(padding, d), _tuple(bound["dilation"], d),
                    int(bound["groups"]),
                )  # fmt: skip
                return _Conv.apply(x, bound["weight"], bound["bias"], conf, self)
        if func is F.batch_norm:
            bound = {**_BN_DEFAULTS, **dict(zip(_BN_ARGS, args, strict=False)), **kwargs}
            mean, var = bound["running_mean"], bound["running_var"]
            x = bound["input"]
            if not bound["training"] and mean is not None and var is not None and x.dim() >= 2:
                scale = torch.rsqrt(var + bound["eps"])
                if bound["weight"] is not None:
                    scale = scale * bound["weight"]
                shift = -mean * scale
                if bound["bias"] is not None:
                    shift = shift + bound["bias"]
                shape = (1, -1) + (1,) * (x.dim() - 2)
                return torch.addcmul(shift.view(shape), x, scale.view(shape))
        return func(*args, **kwargs)
