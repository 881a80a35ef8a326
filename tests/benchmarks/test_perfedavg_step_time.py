"""Per-FedAvg meta-step time vs one AdamW step (on demand: ``python -m pytest tests/benchmarks/test_perfedavg_step_time.py
-m benchmark -s``).

Quick UTNet (base_chan 8), 128x128 single-channel images, batch 4, float32 on the CPU, 2 threads. Same model, same
batches, the three kinds of step interleaved; median of the repetitions. An AdamW step is one forward + backward on
one batch + ``optimizer.step``; a Per-FedAvg FO meta-step is two forward + backward passes (D at w, D' at w_tmp);
HF adds a double backward on D'' (the Hessian-vector product). Then the same per step inside ``train_round``
(batch fetching and augmentation included). Prints ratios against the AdamW step measured in the same run;
nothing here asserts a timing. ``FEDSEG_BENCH_DEVICE=cuda`` runs the first benchmark on the GPU instead (float32,
synchronised timers).
"""

import copy
import os
import statistics
import time

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.benchmark

MODEL_ARGS = {"base_chan": 8, "attn_drop": 0.0, "proj_drop": 0.0}


def _batch(g, device):
    x = torch.randn(4, 1, 128, 128, generator=g)
    y = (torch.rand(4, 1, 128, 128, generator=g) < 0.1).float()
    return x.to(device), y.to(device)


def test_perfedavg_meta_step_vs_adamw_step():
    from fedseg.algorithms.perfedavg import perfedavg_step
    from fedseg.losses import SoftDiceLoss
    from fedseg.models import get_model

    device = torch.device(os.environ.get("FEDSEG_BENCH_DEVICE", "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    base = get_model("utnet", in_channels=1, num_classes=1, **MODEL_ARGS).to(device)
    n_params = sum(p.numel() for p in base.parameters())
    loss_fn = SoftDiceLoss()
    g = torch.Generator().manual_seed(0)
    d, d1, d2 = _batch(g, device), _batch(g, device), _batch(g, device)
    models = {k: copy.deepcopy(base).train() for k in ("adamw", "fo", "hf")}
    opt = torch.optim.AdamW(models["adamw"].parameters(), lr=1e-4, weight_decay=0.01)

    def adamw():
        opt.zero_grad(set_to_none=True)
        loss_fn(models["adamw"](d[0]), d[1]).backward()
        opt.step()

    steps = {
        "adamw": adamw,
        "fo": lambda: perfedavg_step(models["fo"], loss_fn, d, d1, 1e-3, 1e-4, variant="fo"),
        "hf": lambda: perfedavg_step(models["hf"], loss_fn, d, d1, 1e-3, 1e-4, variant="hf", batch_d2=d2),
    }
    for f in steps.values():  # warm-up
        f()
    reps = int(os.environ.get("FEDSEG_BENCH_REPS", "7"))
    times = {k: [] for k in steps}
    for rep in range(reps):
        for k in (list(steps) if rep % 2 == 0 else list(steps)[::-1]):
            sync()
            t0 = time.perf_counter()
            steps[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    where = "CPU 2 threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"\n[benchmark] one step, UTNet base 8 ({n_params:,} params), 128x128, batch 4, {where}, float32, "
          f"median of {reps} interleaved: AdamW {med['adamw'] * 1e3:.0f} ms, Per-FedAvg FO {med['fo'] * 1e3:.0f} ms "
          f"(x{med['fo'] / med['adamw']:.2f}), HF {med['hf'] * 1e3:.0f} ms (x{med['hf'] / med['adamw']:.2f}); "
          f"HF/FO x{med['hf'] / med['fo']:.2f}")


def test_perfedavg_round_time_per_step():
    """Per step inside ``train_round`` on a built-in LiTS site (batch fetching and augmentation included)."""
    from fedseg.models import get_model
    from fedseg.sitedata import augmenter, load_site_data
    from fedseg.training import LocalTrainer, TrainConfig

    torch.set_num_threads(2)
    train, _ = load_site_data("lits", "site-4", "train", {"image_size": 128, "min_tumour_pixels": 12})
    torch.manual_seed(0)
    init = get_model("utnet", in_channels=1, **MODEL_ARGS).state_dict()
    configs = {
        "adamw": {"aggregation": "fedavg"},
        "fo": {"aggregation": "fedavg", "algorithm": "perfedavg", "perfedavg_variant": "fo"},
        "hf": {"aggregation": "fedavg", "algorithm": "perfedavg", "perfedavg_variant": "hf"},
    }
    trainers = {}
    for k, extra in configs.items():
        cfg = TrainConfig(batch_size=4, local_epochs=1, max_steps_per_round=6, device="cpu", seed=1, **extra)
        trainers[k] = LocalTrainer(get_model("utnet", in_channels=1, **MODEL_ARGS), train, cfg,
                                   augment_fn=augmenter("lits"))
        trainers[k].train_round(init)  # warm-up
    per_step = {k: [] for k in trainers}
    for rep in range(3):
        for k in (list(trainers) if rep % 2 == 0 else list(trainers)[::-1]):
            res = trainers[k].train_round(init)
            per_step[k].append(res.metrics["train_seconds"] / res.steps)
    med = {k: statistics.median(v) for k, v in per_step.items()}
    print(f"\n[benchmark] train_round per step (lits site-4, {len(train.delta)} images, 6 steps, augmentation on), "
          f"median of 3: AdamW {med['adamw'] * 1e3:.0f} ms, Per-FedAvg FO {med['fo'] * 1e3:.0f} ms "
          f"(x{med['fo'] / med['adamw']:.2f}), HF {med['hf'] * 1e3:.0f} ms (x{med['hf'] / med['adamw']:.2f}); "
          f"samples per step 4 / 8 / 12")
    assert np.isfinite(list(med.values())).all()
