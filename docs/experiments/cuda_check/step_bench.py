"""Local training step time of fedseg's trainer on CPU vs CUDA (fp32 and AMP), same model and data, one run.

Usage: python step_bench.py [--base-chan 32] [--size 512] [--steps 20] [--cpu-steps 3]
Prints seconds per step and the ratios against the CPU baseline measured in the same run.
"""

import argparse
import json
import time

import numpy as np
import torch

from fedseg.models import count_parameters, get_model
from fedseg.training import LocalTrainer, TrainConfig


class Rows:
    def __init__(self, n, size, seed=0):
        rng = np.random.default_rng(seed)
        self.images = rng.normal(size=(n, size, size)).astype(np.float32)
        yy, xx = np.mgrid[:size, :size]
        self.masks = np.stack([((yy - size / 2) ** 2 + (xx - size / 2 - i) ** 2 < (size / 6) ** 2) for i in range(n)]).astype(np.uint8)
        self.delta = np.zeros(n, np.float32)
        self.small = np.zeros(n, bool)
        self.nonempty = np.ones(n, bool)


def time_round(device, amp, args, data):
    torch.manual_seed(0)
    model = get_model("utnet", in_channels=1, base_chan=args.base_chan, attn_drop=0.0, proj_drop=0.0)
    steps = args.steps if device != "cpu" else args.cpu_steps
    cfg = TrainConfig(batch_size=args.batch, local_epochs=1000, max_steps_per_round=steps, device=device, amp=amp,
                      augment=False)
    tr = LocalTrainer(model, data, cfg)
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    warm = LocalTrainer(model, data, TrainConfig(batch_size=args.batch, local_epochs=1, max_steps_per_round=2,
                                                 device=device, amp=amp, augment=False))
    warm.train_round(state)
    if device != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = tr.train_round(state)
    if device != "cpu":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / res.steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else None
    return dt, res.metrics["train_loss"], count_parameters(model), mem


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-chan", type=int, default=32)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cpu-steps", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    data = Rows(64, args.size)
    out = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "cpu_threads": torch.get_num_threads(), "base_chan": args.base_chan, "size": args.size, "batch": args.batch}
    cpu, _, n_params, _ = time_round("cpu", False, args, data)
    out.update(params=n_params, cpu_s_per_step=cpu)
    print(f"UTNet base {args.base_chan} ({n_params:,} params), batch {args.batch} x {args.size}^2")
    print(f"cpu ({torch.get_num_threads()} threads): {cpu:.3f} s/step (baseline)")
    if torch.cuda.is_available():
        for amp in (False, True):
            dt, loss, _, mem = time_round("cuda", amp, args, data)
            key = "cuda_amp" if amp else "cuda_fp32"
            out[f"{key}_s_per_step"], out[f"{key}_peak_gib"], out[f"{key}_loss"] = dt, mem, loss
            print(f"{key}: {dt:.4f} s/step, peak {mem:.2f} GiB, loss {loss:.4f}, speed-up vs cpu x{cpu / dt:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
