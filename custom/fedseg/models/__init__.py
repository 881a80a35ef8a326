"""Segmentation models by name.

``get_model("utnet", in_channels, num_classes, **kwargs)`` builds :class:`fedseg.models.utnet.UTNet` (kwargs are
UTNet's: ``base_chan``, ``reduce_size``, ``block_list``, ``num_blocks``, ``num_heads``, ``attn_drop``, ``proj_drop``,
``projection``, ``rel_pos``, ``maxpool``, ``bottleneck``, ``weight_init``); ``get_model("unet", ...)`` builds a light
MONAI ``BasicUNet`` (:func:`fedseg.models.unet.build_unet`); ``get_model("sd_utnet", ...)`` builds
:class:`fedseg.models.sd_utnet.SDUTNet` (SDNet with a UTNet anatomy encoder; kwargs are its constructor's, UTNet's
included, and it has its own ``training_loss(x, y)``). Every model returns logits ``[N, num_classes, H, W]``, except
``get_model("unet25d", in_channels=5, base_chan=8)``: PPPML-HMI's 2.5D U-Net
(:class:`fedseg.models.unet25d.UNet25D`; ``in_channels`` = slices per view) maps ``[N, 3, 5, S, S]`` to ``[N, 3, S, S]``
(one logit map per view) and has its own ``training_loss(x, y)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from fedseg.errors import ConfigError

__all__ = ["get_model", "count_parameters", "available_models"]


def _build_utnet(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    from fedseg.models.utnet import UTNet

    _check_kwargs("utnet", UTNet.__init__, kwargs, reserved=("in_chan", "num_classes"))
    return UTNet(in_chan=in_channels, num_classes=num_classes, **kwargs)


def _build_sd_utnet(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    from fedseg.models.sd_utnet import SDUTNet

    _check_kwargs("sd_utnet", SDUTNet.__init__, kwargs, reserved=("in_chan", "num_classes"))
    return SDUTNet(in_chan=in_channels, num_classes=num_classes, **kwargs)


def _build_unet25d(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    from fedseg.models.unet25d import UNet25D

    _check_kwargs("unet25d", UNet25D.__init__, kwargs, reserved=("in_chan", "num_classes"))
    return UNet25D(in_chan=in_channels, num_classes=num_classes, **kwargs)


def _build_unet(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    from monai.networks.nets import BasicUNet

    from fedseg.models.unet import build_unet

    allowed = set(inspect.signature(BasicUNet.__init__).parameters) - {"self", "in_channels", "out_channels"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(f"model 'unet' does not accept {unknown}; valid options: {sorted(allowed)}")
    return build_unet(in_channels=in_channels, num_classes=num_classes, **kwargs)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "utnet": _build_utnet,
    "unet": _build_unet,
    "sd_utnet": _build_sd_utnet,
    "unet25d": _build_unet25d,
}


def _check_kwargs(name: str, fn: Callable[..., Any], kwargs: dict[str, Any], reserved: tuple[str, ...]) -> None:
    params = set(inspect.signature(fn).parameters) - {"self"}
    clash = sorted(set(kwargs) & set(reserved))
    if clash:
        raise ConfigError(f"model {name!r}: pass in_channels/num_classes to get_model, not {clash}")
    unknown = sorted(set(kwargs) - params)
    if unknown:
        raise ConfigError(f"model {name!r} does not accept {unknown}; valid options: {sorted(params - set(reserved))}")


def available_models() -> list[str]:
    """Names accepted by :func:`get_model`."""
    return sorted(_REGISTRY)


def get_model(name: str, in_channels: int = 1, num_classes: int = 1, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` (case-insensitive); raises ``ConfigError`` for an unknown name."""
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(available_models())}")
    if int(in_channels) < 1 or int(num_classes) < 1:
        raise ConfigError(f"model {key!r}: in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
    return _REGISTRY[key](int(in_channels), int(num_classes), **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (all by default; only ``requires_grad`` ones with ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
