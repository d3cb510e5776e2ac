"""Reference networks that hawq ships (no downloads: weights come from local files)."""

from hawq.models.resnet_cifar import CifarResNet, cifar_resnet, load_cifar_checkpoint
from hawq.models.squeezenext import SqueezeNext, SqueezeNextBlock, squeezenext

__all__ = [
    "CifarResNet",
    "SqueezeNext",
    "SqueezeNextBlock",
    "cifar_resnet",
    "load_cifar_checkpoint",
    "squeezenext",
]
