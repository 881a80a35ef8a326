"""Base class of the cached 2-D segmentation datasets (:class:`fedseg.data.lits.LiTSSliceDataset`,
:class:`fedseg.data.polypgen.PolypGenDataset`).

The subclasses validate the array shapes against the manifest, summarise themselves and decide how they pickle
(their arrays are memory maps of the on-disk cache); the sample access is shared here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CachedSegmentationDataset"]


class CachedSegmentationDataset(torch.utils.data.Dataset):
    """Samples of a cached data set: ``images`` [N, S, S] (or [N, C, S, S] with ``image_has_channels``),
    ``masks`` [N, S, S] uint8 {0, 1}, ``manifest`` (one dict per sample with ``delta``, ``small`` and
    ``mask_pixels``) and the per-sample arrays ``delta`` float32 [N], ``small`` bool [N], ``nonempty`` bool [N]
    (the resized mask has a foreground pixel).
    """

    #: images already carry a channel axis ([N, C, S, S]); otherwise one is added ([N, S, S] -> [N, 1, S, S])
    image_has_channels = False

    def __init__(self, images: Any, masks: Any, manifest: list[dict[str, Any]], *, site: str | None, centre: str,
                 part: str, prep: Any, cache_path: Path | None = None, origin: str = "") -> None:
        self.images = images
        self.masks = masks
        self.manifest = manifest
        self.site = site
        self.centre = centre
        self.part = part
        self.prep = prep
        self.cache_path = cache_path
        self.origin = origin
        self.delta = np.array([r["delta"] for r in manifest], dtype=np.float32)
        self.small = np.array([r["small"] for r in manifest], dtype=bool)
        self.nonempty = np.array([r["mask_pixels"] > 0 for r in manifest], dtype=bool)

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < 0:
            i += len(self)
        image = torch.from_numpy(np.asarray(self.images[i], dtype=np.float32))
        if not self.image_has_channels:
            image = image[None]
        mask = torch.from_numpy(np.asarray(self.masks[i], dtype=np.float32))[None]
        return {"image": image, "mask": mask, "delta": torch.tensor(self.delta[i], dtype=torch.float32),
                "small": torch.tensor(bool(self.small[i])), "index": i}

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All samples at once: images [N,C,S,S] float32, masks [N,1,S,S] float32, delta [N], small [N]."""
        images = torch.from_numpy(np.asarray(self.images, dtype=np.float32))
        if not self.image_has_channels:
            images = images[:, None]
        masks = torch.from_numpy(np.asarray(self.masks, dtype=np.float32))[:, None]
        return images, masks, torch.from_numpy(self.delta.copy()), torch.from_numpy(self.small.copy())
