"""Evaluation of a segmentation model on a dataset: per-image Dice, Dice / DiceS / DiceL, prediction overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedseg.metrics import dice_per_image, summarize_dice


def image_batch(data, idx: np.ndarray) -> torch.Tensor:
    """float32 [B, C, H, W] images of rows ``idx`` (grey datasets store [N, H, W], colour ones [N, C, H, W])."""
    x = torch.from_numpy(np.ascontiguousarray(data.images[idx], dtype=np.float32))
    return x.unsqueeze(1) if x.ndim == 3 else x


def mask_batch(data, idx: np.ndarray) -> torch.Tensor:
    """float32 [B, 1, H, W] masks of rows ``idx``."""
    return torch.from_numpy(np.ascontiguousarray(data.masks[idx], dtype=np.float32)).unsqueeze(1)


@torch.no_grad()
def predict_masks(model: torch.nn.Module, data, device: torch.device, batch_size: int = 16) -> np.ndarray:
    """Binary predictions [N, S, S] (uint8) of ``model`` on ``data``."""
    model.eval()
    out = []
    n = len(data.delta)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        x = image_batch(data, idx).to(device)
        with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            logits = model(x)
        out.append((logits[:, 0].float() > 0).to(torch.uint8).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,) + tuple(np.shape(data.masks)[1:]), np.uint8)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, data, device: torch.device, batch_size: int = 16) -> dict[str, Any]:
    """Per-image foreground Dice of thresholded predictions, summarised as Dice / DiceS / DiceL (DESIGN.md 2)."""
    model.eval()
    n = len(data.delta)
    dice = np.zeros(n, dtype=np.float64)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        x = image_batch(data, idx).to(device)
        y = torch.from_numpy(np.ascontiguousarray(data.masks[idx])).to(device) > 0
        with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            logits = model(x)
        pred = logits[:, 0].float() > 0  # sigmoid(logit) > 0.5
        dice[idx] = dice_per_image(pred, y).double().cpu().numpy()
    summary = summarize_dice(dice, np.asarray(data.small, bool), np.asarray(data.nonempty, bool))
    summary["per_image_dice"] = dice
    return summary


def evaluate_dataset(model: torch.nn.Module, data, device: torch.device, batch_size: int = 16) -> dict[str, Any]:
    """Metrics of ``model`` on ``data``: the dataset's own ``evaluate`` hook when it has one (e.g. the COVID 2.5D
    data: volumetric Dice of the fused 3-D prediction per case), else :func:`evaluate_model` (per-image 2-D Dice)."""
    if hasattr(data, "evaluate"):
        return data.evaluate(model, device, batch_size)
    return evaluate_model(model, data, device, batch_size)


def write_prediction_overlays(model: torch.nn.Module, data, device: torch.device, per_image_dice: np.ndarray,
                              out_png: Path, n: int = 8) -> Path | None:
    """Overlay figure of up to ``n`` non-empty images, half with small lesions (TP green, FP red, FN blue)."""
    from fedseg.results import plot_overlays

    nonempty = np.flatnonzero(np.asarray(data.nonempty))
    small = np.asarray(data.small, bool)
    small_idx, large_idx = nonempty[small[nonempty]], nonempty[~small[nonempty]]
    n_small = min(len(small_idx), max(n // 2, n - len(large_idx)))
    # evenly spaced picks so the figure spans the whole set, not one volume
    def pick(pool, k):
        return pool[np.linspace(0, len(pool) - 1, k).round().astype(int)] if k > 0 else pool[:0]

    idx = np.unique(np.concatenate([pick(small_idx, n_small), pick(large_idx, min(len(large_idx), n - n_small))]))
    if idx.size == 0:
        return None

    class _Rows:
        images, masks, delta = data.images[idx], data.masks[idx], np.asarray(data.delta)[idx]

    preds = predict_masks(model, _Rows, device)
    titles = [f"#{i} {'small' if data.small[i] else 'large'} Dice {per_image_dice[i]:.2f}" for i in idx]
    return plot_overlays(np.asarray(data.images[idx], np.float32), np.asarray(data.masks[idx]), preds, out_png, titles)
