"""Reference point for the personalized runs: a model with each site's OWN BatchNorm statistics.

For a model file (or, with a run folder, each site's personalized/model.pt) and every site: reset the BatchNorm
running statistics, recompute them as plain averages over the site's training images (train-mode forward passes,
no gradient, no weight change), and score the model on the site's validation part before and after. Applied to the
FedAvg global model this is "FedAvg + site BatchNorm statistics" (post-hoc FedBN, no extra training). Run from the
repository root:

    python docs/experiments/resfim_cpu/bn_recalibration.py MODEL.pt|RUN_DIR LABEL > OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from fedseg.evaluation import evaluate_dataset, image_batch
from fedseg.jobs.recipes import JOBS
from fedseg.models import get_model
from fedseg.sitedata import load_site_data
from fedseg.training import load_state


def main(source: str, label: str) -> dict:
    torch.set_num_threads(2)
    job = JOBS["resfim_polypgen"]
    device = torch.device("cpu")
    out = {"model": label, "source": source, "sites": {}}
    for i in range(1, job.min_clients + 1):
        site = f"site-{i}"
        train, _ = load_site_data(job.dataset, site, "train", job.data_args)
        val, _ = load_site_data(job.dataset, site, "val", job.data_args)
        path = Path(source) if source.endswith(".pt") else Path(source) / site / "simulate_job/personalized/model.pt"
        model = get_model(job.model, in_channels=job.in_channels, num_classes=job.num_classes, **job.model_args)
        load_state(model, torch.load(path, map_location="cpu"))
        before = evaluate_dataset(model, val, device, 16)["dice"]
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over all batches
        model.train()
        with torch.no_grad():
            n = len(train.delta)
            for s in range(0, n, 8):
                model(image_batch(train, np.arange(s, min(n, s + 8))))
        after = evaluate_dataset(model, val, device, 16)["dice"]
        out["sites"][site] = {"dice": before, "dice_own_bn_statistics": after}
    for key in ("dice", "dice_own_bn_statistics"):
        out[f"mean_{key}"] = float(np.mean([v[key] for v in out["sites"].values()]))
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else sys.argv[1]), indent=2))
