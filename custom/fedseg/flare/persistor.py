"""Model persistor that builds the initial global model by name (``fedseg.models.get_model``), seeded."""

from __future__ import annotations

import torch
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from fedseg.models import get_model


class SegModelPersistor(PTFileModelPersistor):
    def __init__(self, model: str = "utnet", model_args: dict | None = None, in_channels: int = 1,
                 num_classes: int = 1, seed: int = 0, **kwargs):
        torch.manual_seed(int(seed))
        net = get_model(model, in_channels=in_channels, num_classes=num_classes, **(model_args or {}))
        super().__init__(model=net, **kwargs)
