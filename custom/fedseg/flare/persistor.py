"""Model persistor that builds the initial global model by name (``fedseg.models.get_model``), seeded.

It keeps the model's tensor shapes (``tensor_shapes``: name -> shape). With a persistor filter (``filter_id``, e.g.
:class:`fedseg.flare.he.HEModelSerializeFilter` of an HE job) the global model may hold serialized ciphertexts,
which are flat, and FLARE's HE shareable generator flattens plaintext entries: the saved checkpoint then carries
``"tensor_shapes"`` (so ``fedseg he-decrypt`` can give every tensor back its shape) and flat plaintext entries are
saved in their model shape. Jobs without a filter save exactly what FLARE's PTFileModelPersistor saves.
"""

from __future__ import annotations

import numpy as np
import torch
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from fedseg.models import get_model


class SegModelPersistor(PTFileModelPersistor):
    def __init__(self, model: str = "utnet", model_args: dict | None = None, in_channels: int = 1,
                 num_classes: int = 1, seed: int = 0, **kwargs):
        torch.manual_seed(int(seed))
        net = get_model(model, in_channels=in_channels, num_classes=num_classes, **(model_args or {}))
        self.tensor_shapes = {k: [int(d) for d in v.shape] for k, v in net.state_dict().items()}
        super().__init__(model=net, **kwargs)

    def load_model(self, fl_ctx):
        learnable = super().load_model(fl_ctx)
        if self.filter_id and self.persistence_manager is not None:
            self.persistence_manager.other_props["tensor_shapes"] = dict(self.tensor_shapes)
        return learnable

    def save_model(self, ml, fl_ctx):
        if self.filter_id:
            weights = ml.get(ModelLearnableKey.WEIGHTS) or {}
            for name, value in weights.items():
                shape = self.tensor_shapes.get(name)
                if isinstance(value, np.ndarray) and shape is not None and list(value.shape) != shape \
                        and value.size == int(np.prod(shape)):
                    weights[name] = value.reshape(shape)
        super().save_model(ml, fl_ctx)
