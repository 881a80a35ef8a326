"""How reproducible is a ResFIM mask? Split-half reliability of the residual ranking, "abs" vs "relative".

For one model and each site: the residual Fisher on two disjoint sets of 12 training samples (each with its copies in
every other site's style, exactly as a run computes it), the top-10% mask of each half, and the share of the first
half's kept-local parameters that the second half keeps local too (chance level = 0.10). Also where the kept-local
parameters sit (UTNet block), for the first half. Run from the repository root:

    python docs/experiments/resfim_cpu/mask_reliability.py MODEL.pt|init [MODEL_LABEL] > OUT.json
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from fedseg.algorithms.personalization import PersonalizationConfig, resfim_mask, styled_batches
from fedseg.algorithms.spectral import StyleBank
from fedseg.evaluation import image_batch, mask_batch
from fedseg.jobs.recipes import JOBS
from fedseg.models import get_model
from fedseg.sitedata import load_site_data
from fedseg.training import LocalTrainer, TrainConfig, load_state

SAMPLES, FRACTION = 12, 0.1  # two disjoint halves of 12: the smallest site has 24 training samples


def main(model_path: str, label: str) -> dict:
    torch.set_num_threads(1)
    job = JOBS["resfim_polypgen"]
    cfg = PersonalizationConfig(**job.personalization_args)
    sites = [f"site-{i}" for i in range(1, job.min_clients + 1)]
    data = {s: load_site_data(job.dataset, s, "train", job.data_args)[0] for s in sites}
    bank = StyleBank(cfg.beta)
    for s in sites:
        bank.add_images(s, list(image_batch(data[s], np.arange(min(cfg.style_samples, len(data[s].delta)))).numpy()))
    model = get_model(job.model, in_channels=job.in_channels, num_classes=job.num_classes, **job.model_args)
    if model_path == "init":  # the job's untrained model (the persistor's seed)
        torch.manual_seed(job.seed)
        model = get_model(job.model, in_channels=job.in_channels, num_classes=job.num_classes, **job.model_args)
    else:
        load_state(model, torch.load(model_path, map_location="cpu"))
    out = {"model": label, "samples_per_half": SAMPLES, "fraction": FRACTION, "sites": {}}
    for s in sites:
        d = data[s]
        perm = np.random.default_rng(0).permutation(len(d.delta))
        if len(perm) < 2 * SAMPLES:
            raise SystemExit(f"{s} has {len(perm)} training samples, fewer than 2 x {SAMPLES}")
        module, loss = LocalTrainer(model, d, TrainConfig(device="cpu")).loss_view(model)
        row = {}
        for mode in ("abs", "relative"):
            masks = []
            for half in (np.sort(perm[:SAMPLES]), np.sort(perm[SAMPLES:2 * SAMPLES])):
                real = [(image_batch(d, half[i:i + 4]), mask_batch(d, half[i:i + 4])) for i in range(0, SAMPLES, 4)]
                styled = styled_batches(real, bank, s)
                m, _ = resfim_mask(module, loss, real, styled,
                                   PersonalizationConfig(fraction=FRACTION, residual=mode))
                masks.append({k[len("net."):]: v for k, v in m.items()})
            a = np.concatenate([masks[0][k].ravel() for k in sorted(masks[0])])
            b = np.concatenate([masks[1][k].ravel() for k in sorted(masks[1])])
            blocks: dict[str, float] = {}
            sizes: dict[str, int] = {}
            for k, m in masks[0].items():
                blk = k.split(".")[0]
                blocks[blk] = blocks.get(blk, 0) + int(m.sum())
                sizes[blk] = sizes.get(blk, 0) + int(m.size)
            row[mode] = {"overlap": float((a & b).sum() / max(a.sum(), 1)),
                         "kept_local_share_of_block": {k: round(blocks[k] / sizes[k], 4) for k in sorted(blocks)}}
        out["sites"][s] = row
    for mode in ("abs", "relative"):
        out[f"mean_overlap_{mode}"] = float(np.mean([r[mode]["overlap"] for r in out["sites"].values()]))
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else sys.argv[1]), indent=2))
