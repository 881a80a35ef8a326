"""Light U-Net alternative to UTNet: MONAI's ``BasicUNet`` in 2-D with configurable widths.

Defaults differ from MONAI's on purpose: features ``(16, 16, 32, 64, 128, 16)`` (a quarter of MONAI's parameter
count, ~0.5 M) so the CPU demo and integration tests stay fast, and BatchNorm instead of instance norm so the model
carries the same kinds of state as UTNet (float running statistics and integer ``num_batches_tracked`` buffers),
which the federated aggregation must handle. Any ``BasicUNet`` argument can be overridden through
:func:`fedseg.models.get_model` (``features``, ``norm``, ``act``, ``dropout``, ``upsample``, ``bias``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from fedseg.errors import ConfigError

DEFAULT_FEATURES: tuple[int, ...] = (16, 16, 32, 64, 128, 16)


def build_unet(in_channels: int = 1, num_classes: int = 1, features: Sequence[int] = DEFAULT_FEATURES,
               norm: str | tuple = ("batch", {"affine": True}), **kwargs: Any) -> nn.Module:
    """A 2-D MONAI ``BasicUNet`` returning logits ``[N, num_classes, H, W]`` (any H, W; multiples of 16 are exact)."""
    from monai.networks.nets import BasicUNet

    features = tuple(int(f) for f in features)
    if len(features) != 6 or min(features) < 1:
        raise ConfigError(
            f"unet features must be 6 positive channel counts (5 encoder levels + the last decoder level), "
            f"got {features}; e.g. {DEFAULT_FEATURES}"
        )
    if "spatial_dims" in kwargs and kwargs.pop("spatial_dims") != 2:
        raise ConfigError("the fedseg unet is 2-D; do not set spatial_dims")
    return BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes, features=features, norm=norm,
                     **kwargs)
