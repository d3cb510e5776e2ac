"""Reference networks that hawq ships (no downloads: weights come from local files)."""

from hawq.models.resnet_cifar import CifarResNet, cifar_resnet, load_cifar_checkpoint

__all__ = ["CifarResNet", "cifar_resnet", "load_cifar_checkpoint"]
