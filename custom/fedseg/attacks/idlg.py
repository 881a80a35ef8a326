"""iDLG gradient-leakage evaluation for segmentation (Zhao et al. 2020, "iDLG: Improved Deep Leakage from Gradients").

Pure code: torch, numpy and scikit-image only, no nvflare import. ``fedseg attack idlg`` drives it.

What is attacked
----------------
A victim site holds ONE private image ``x`` with its mask ``y`` and makes ONE local step of plain SGD with learning
rate ``lr`` from the global weights ``w0``: ``w1 = w0 - lr * grad_w l(M(x; w0), y)``. Its update in FLARE's WEIGHT_DIFF
convention is ``Delta = w1 - w0 = -lr * g`` (:func:`local_sgd_update`). An attacker who knows ``w0``, ``lr`` and the
loss sees one of these *views* of ``Delta`` and inverts it as if it were ``-lr * g`` (:func:`gradient_from_view`):

* ``fedavg`` (:func:`fedavg_view`): the plain update, as the FedAvg server (or anyone on the wire without TLS) sees it;
  ``g = -Delta / lr`` exactly (up to float32 rounding of ``w1 - w0``).
* ``csahe-member`` (:func:`csahe_member_view`): what the first ring member after the initiator receives in CSAHE,
  decrypted as if the round key had leaked: ``w_I * Delta + R`` with ``R ~ N(0, sigma^2)`` (sigma >= 100) drawn by
  :class:`fedseg.algorithms.csahe.Initiator` from a CSPRNG. ``method="decrypt"`` runs the real protocol
  (``Initiator.start()``, then decrypts the wire messages with the initiator's private context: the "key leaked"
  assumption, the only place this code touches it); ``method="plaintext"`` adds the same kind of mask to the plaintext
  (a fresh ``secrets``-seeded PCG64 normal draw, as ``Initiator.start``) without CKKS, for models too large to encrypt
  in an evaluation. The attacker is given ``w_I`` and ``lr`` and inverts ``-(view) / (w_I * lr)``.
* ``dp`` (:func:`dp_view`): the update after a differential-privacy mechanism (clipping + noise), given as a callable
  ``mechanism(update) -> noised update`` (dicts name -> float array). The adaptive-DP filter of issue 5 supplies it;
  the tests use a local L1-clip + Laplace mechanism.

The attack (Algorithm 2 of the PPPML-HMI paper, DLG/iDLG)
---------------------------------------------------------
Dummy image ``x'`` ~ N(0, 1) and dummy mask logits ``m'``; the soft mask ``sigmoid(m')`` is the target in the victim's
loss. Each iteration computes the dummy gradient ``g' = grad_w l(M(x'; w0), sigmoid(m'))`` with ``create_graph=True``
and minimises a gradient-matching loss ``D(g', g)`` (+ ``tv_weight * TV(x')``) over the dummy variables.

The label. For classification iDLG reads the label off the sign of the last layer's gradient and then optimises the
image only (Algorithm 2, line 1). The segmentation analogue (:func:`extract_mask`): when the model's output layer has
a per-pixel bias (:class:`SmallCNN`'s fully connected head), its gradient is ``dl/dz_p`` for every pixel, and for both
the soft-Dice and the BCE loss ``y_p = 1`` exactly when ``dl/dz_p < 0`` -- the whole mask is read off the gradient.
``label="extract"`` (default) then fixes ``m'`` to it and optimises ``x'`` only. When the model has no per-pixel bias
(a 1x1 conv head: U-Net, UTNet, ``small_cnn`` with ``head="conv"``: its bias gradient is a sum over pixels) or with
``label="joint"``, the mask is reconstructed jointly with the image as DLG does for labels: ``m'`` ~ N(0, 1) optimised
together with ``x'``. ``AttackResult.label_init`` says which happened.

Matching loss ``D``:

* ``"l2-layer"`` (default): ``mean_layers ||g'_l - g_l||^2 / ||g_l||^2``. DLG/iDLG's squared distance with each
  parameter tensor normalised by its observed gradient's norm. Why: in a net like :class:`SmallCNN` the first conv's
  gradient (the one that carries the image's fine detail) is ~1000x smaller than the head's, so in plain L2 the image
  detail is invisible to the optimiser. Measured with ``fedseg attack idlg --scenario fedavg --image-size 16
  --iterations 200 --seed 0..3`` (small_cnn, Dice loss, L-BFGS): plain ``"l2"`` stalls at 9.7-10.7 dB PSNR (SSIM
  0.30-0.37), ``"l2-layer"`` reaches 35.0-41.3 dB (SSIM >= 0.995).
* ``"l2"``: DLG/iDLG's ``sum_layers ||g' - g||^2`` (divided by ``||g||^2``, a constant: same minimiser).
* ``"cosine"`` (Geiping et al. 2020, "Inverting Gradients"): ``1 - <g', g> / (|g'| |g|)`` over the whole flattened
  gradient; scale-invariant (the attacker need not know ``lr`` or the aggregation weight), usually run with Adam and a
  TV prior; offered for deeper models.

All three use the gradient's scale only as far as the attacker knows it (``lr`` and ``w_I`` are given to it).
``tv_weight * TV(x')`` (anisotropic total variation) is an optional image prior (0 by default: iDLG has none).
Optimisers: ``"lbfgs"`` (default, as DLG/iDLG: torch L-BFGS with strong-Wolfe line search, one iteration per step so
``iterations`` counts L-BFGS iterations and the progress bar and snapshots follow them) or ``"adam"``. The objective is
divided by its value at the initial guess (L-BFGS skips curvature pairs below an absolute 1e-10 and then crawls) and
runs in float64 on a copy of the model; the observed gradient stays what the victim's float32 update gives.

Float32 updates. ``w1 - w0`` is rounded to float32 at the scale of ``|w0|``: with a small ``lr`` the small early-layer
gradients are partly or wholly rounded away before anyone sees them (32x32 LiTS slice, :class:`SmallCNN`, lr = 1e-4:
289 of the first conv's 300 weight updates and all 12 bias updates are 0; the gradient recovered from them is 97% off,
against 1.4% at lr = 0.1), which defeats the image reconstruction even in the plain FedAvg scenario. The command's
default ``lr`` (0.1) is therefore the attacker-friendly end.

Which models leak: DLG works best on small, smooth (sigmoid) networks without BatchNorm, and on networks with a fully
connected layer (whose gradient is an outer product that exposes its input). :class:`SmallCNN` is DLG's LeNet with
such a head. Fully convolutional nets at PyTorch's default initialisation leak much less to this attack, and with
BatchNorm in train mode (``unet``, ``utnet``) the batch statistics enter the gradient; the code is the same but the
reconstructions are poor, and 14 M-parameter UTNet is slow on a CPU (every iteration is a double backward pass).
Dropout layers are put in eval mode for both the victim's step and the attacker (the attacker cannot know the
victim's dropout masks; disabling them favours the attacker).

Metrics (:func:`reconstruction_metrics`): PSNR and SSIM (``skimage.metrics``) of the reconstruction, clipped to the
normalised intensity range ``[lo, hi]`` (a free post-processing for an attacker who knows the normalisation), against
the true image with ``data_range = hi - lo``; Dice of ``sigmoid(m') >= 0.5`` against the true mask. For context
:func:`baseline_metrics` gives the PSNR/SSIM of guesses that use no gradient at all (the constant mid-range image and a
uniform random image).
"""

from __future__ import annotations

import copy
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fedseg.errors import ConfigError, UpdateRejected

__all__ = [
    "LABEL_LOGIT",
    "SCENARIOS",
    "AttackConfig",
    "AttackResult",
    "SmallCNN",
    "baseline_metrics",
    "build_attack_model",
    "csahe_member_view",
    "dice_binary",
    "dp_view",
    "extract_mask",
    "fedavg_view",
    "gradient_from_view",
    "gradient_match_loss",
    "idlg_attack",
    "local_sgd_update",
    "make_loss",
    "psnr",
    "reconstruction_metrics",
    "ssim",
    "total_variation",
]

SCENARIOS = ("fedavg", "csahe-member", "dp")
MATCHES = ("l2-layer", "l2", "cosine")
Update = dict[str, np.ndarray]
Mechanism = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


# ---------------------------------------------------------------------------------------------------------------------
# model


class SmallCNN(nn.Module):
    """DLG's LeNet made a segmentation net, the default attack target: three 5x5 convs (``width`` channels, strides
    2, 2, 1, padding 2, sigmoid activations, no normalisation) and a fully connected head from the features to
    ``num_classes * image_size^2`` per-pixel logits (``head="fc"``), or a 1x1 conv head on the full-resolution
    features (``head="conv"``: fully convolutional, strides 1, 1, 1). Sigmoid keeps the double backward smooth; no
    BatchNorm keeps the gradient a function of the one image only.

    The fc head has a per-pixel output bias (``pixel_bias``): its gradient is ``dl/dz_p`` for every pixel, whose
    sign is the pixel's label for the Dice and BCE losses (iDLG's label extraction, :func:`extract_mask`).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 1, image_size: int = 32, width: int = 12,
                 head: str = "fc", activation: str = "sigmoid") -> None:
        super().__init__()
        if int(width) < 1 or int(image_size) < 4:
            raise ConfigError(f"small_cnn needs width >= 1 and image_size >= 4, got width={width}, "
                              f"image_size={image_size}")
        acts = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
        if activation not in acts:
            raise ConfigError(f"small_cnn activation {activation!r} unknown; choose one of {sorted(acts)}")
        if head not in ("fc", "conv"):
            raise ConfigError(f"small_cnn head must be 'fc' or 'conv', got {head!r}")
        w, act = int(width), acts[activation]
        strides = (2, 2, 1) if head == "fc" else (1, 1, 1)
        self.image_size, self.num_classes, self.head_kind = int(image_size), int(num_classes), head
        self.body = nn.Sequential(
            nn.Conv2d(int(in_channels), w, 5, strides[0], 2), act(),
            nn.Conv2d(w, w, 5, strides[1], 2), act(),
            nn.Conv2d(w, w, 5, strides[2], 2), act(),
        )
        if head == "fc":
            side = ((self.image_size + 1) // 2 + 1) // 2  # ceil(ceil(S / 2) / 2): after two stride-2 convs
            self.head = nn.Linear(w * side * side, self.num_classes * self.image_size**2)
        else:
            self.head = nn.Conv2d(w, self.num_classes, 1)

    @property
    def pixel_bias(self) -> str | None:
        """Name of the per-pixel output bias (fc head), None for the conv head."""
        return "head.bias" if self.head_kind == "fc" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ConfigError(f"small_cnn was built for {self.image_size}x{self.image_size} images, got "
                              f"{tuple(x.shape[-2:])}")
        h = self.body(x)
        if self.head_kind == "conv":
            return self.head(h)
        return self.head(h.flatten(1)).view(x.shape[0], self.num_classes, self.image_size, self.image_size)


def build_attack_model(name: str, in_channels: int = 1, num_classes: int = 1, image_size: int = 32, seed: int = 0,
                       **kwargs: Any) -> nn.Module:
    """The global model ``w0`` of the attack: ``small_cnn`` (:class:`SmallCNN` for ``image_size``) or any
    :func:`fedseg.models.get_model` name, initialised (PyTorch defaults) after ``torch.manual_seed(seed)``."""
    torch.manual_seed(int(seed))
    if str(name).lower() == "small_cnn":
        allowed = {"width", "head", "activation"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ConfigError(f"model 'small_cnn' does not accept {unknown}; valid options: {sorted(allowed)}")
        return SmallCNN(in_channels, num_classes, image_size=image_size, **kwargs)
    from fedseg.models import get_model

    return get_model(name, in_channels=in_channels, num_classes=num_classes, **kwargs)


def make_loss(name: str = "dice") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The victim's training loss: ``"dice"`` (fedseg's SoftDiceLoss, the training default) or ``"bce"``
    (``binary_cross_entropy_with_logits``, mean over pixels). Both accept a soft target (the dummy mask)."""
    if name == "dice":
        from fedseg.losses import SoftDiceLoss

        return SoftDiceLoss()
    if name == "bce":
        return nn.functional.binary_cross_entropy_with_logits
    raise ConfigError(f"unknown loss {name!r}; choose 'dice' (fedseg's training loss) or 'bce'")


def _eval_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------------------------------
# the victim's update and what each attacker sees


def local_sgd_update(model: nn.Module, image: torch.Tensor, mask: torch.Tensor,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], lr: float) -> Update:
    """One plain-SGD step of ``model`` (not modified: a copy steps) on one image ``[1, C, H, W]`` and mask
    ``[1, 1, H, W]`` in train mode; returns the WEIGHT_DIFF update ``w1 - w0`` of the trainable parameters and
    ``b1 - b0`` of the float buffers (float32 numpy arrays, as a site sends them)."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"the victim's learning rate must be a finite number > 0, got {lr!r}")
    if image.dim() != 4 or image.shape[0] != 1 or mask.shape != (1, 1, *image.shape[2:]):
        raise ConfigError(f"one image [1, C, H, W] and its mask [1, 1, H, W] expected, got {tuple(image.shape)} and "
                          f"{tuple(mask.shape)}")
    victim = copy.deepcopy(model).float()
    victim.train()
    _eval_dropout(victim)
    before = {k: v.detach().clone() for k, v in victim.state_dict().items() if v.is_floating_point()}
    opt = torch.optim.SGD([p for _, p in _trainable(victim)], lr=float(lr))
    opt.zero_grad()
    loss = loss_fn(victim(image.float()), mask.float())
    loss.backward()
    opt.step()
    after = victim.state_dict()
    return {k: (after[k] - before[k]).detach().cpu().numpy().astype(np.float32) for k in before}


def fedavg_view(update: Mapping[str, np.ndarray]) -> Update:
    """Scenario (a): the server of plain FedAvg sees the update itself."""
    return {k: np.array(v, copy=True) for k, v in update.items()}


def csahe_member_view(update: Mapping[str, np.ndarray], weight: float, sigma: float = 1e4,
                      method: str = "decrypt") -> tuple[Update, dict[str, Any]]:
    """Scenario (b): ``w_I * Delta + R`` as the first ring member would decrypt it with a leaked round key.

    ``method="decrypt"``: :class:`fedseg.algorithms.csahe.Initiator` packs, masks and encrypts for real; the wire
    messages are decrypted with the initiator's private context (evaluation only: the "key leaked" assumption).
    ``method="plaintext"``: the same mask distribution added without CKKS (fast for large models).
    Returns (view, info) with info = {"method", "sigma", "weight", "ciphertexts", "snr"}: snr = |w_I Delta| / |R|
    (L2 norms over the packed vector).
    """
    import tenseal as ts

    from fedseg.algorithms import csahe

    if method not in ("decrypt", "plaintext"):
        raise ConfigError(f"csahe view method must be 'decrypt' or 'plaintext', got {method!r}")
    initiator = csahe.Initiator("victim", update, weight, sigma=sigma)  # checks sigma, weight and the update
    spec = initiator.spec
    plain = spec.pack(update) * float(weight)
    if method == "decrypt":
        messages = initiator.start()
        ctx = initiator.keys.context  # the private context: the leaked key
        vec = np.concatenate([np.asarray(ts.ckks_vector_from(ctx, csahe.message_payload(m)).decrypt(), np.float64)
                              for m in messages])
        n_ct = len(messages)
    else:
        gen = np.random.Generator(np.random.PCG64(secrets.randbits(128)))
        vec = plain + gen.normal(0.0, initiator.sigma, size=plain.size)
        n_ct = 0
    mask_norm = float(np.linalg.norm(vec[: spec.size] - plain[: spec.size]))
    info = {"method": method, "sigma": float(initiator.sigma), "weight": float(weight), "ciphertexts": n_ct,
            "snr": float(np.linalg.norm(plain[: spec.size]) / mask_norm) if mask_norm > 0 else math.inf}
    return spec.unpack(vec), info


def dp_view(update: Mapping[str, np.ndarray], mechanism: Mechanism) -> Update:
    """Scenario (c): ``mechanism(update)`` (clipping + noise, e.g. issue 5's adaptive-DP filter). The result must
    have the same names and shapes and be finite."""
    noised = mechanism({k: np.array(v, copy=True) for k, v in update.items()})
    if set(noised) != set(update):
        raise UpdateRejected(f"DP mechanism changed the update's entries: {sorted(set(noised) ^ set(update))}")
    out = {}
    for k, v in update.items():
        arr = np.asarray(noised[k])
        if arr.shape != np.shape(v) or not np.all(np.isfinite(arr)):
            raise UpdateRejected(f"DP mechanism returned a bad entry {k!r}: shape {arr.shape} (expected "
                                 f"{np.shape(v)}) or NaN/Inf")
        out[k] = arr
    return out


def gradient_from_view(model: nn.Module, view: Mapping[str, np.ndarray], lr: float,
                       weight: float = 1.0) -> dict[str, torch.Tensor]:
    """What the attacker takes for the gradient: ``-view / (weight * lr)`` for every trainable parameter (float64)."""
    out = {}
    for name, p in _trainable(model):
        if name not in view:
            raise ConfigError(f"the observed update has no entry for parameter {name!r}; it does not match the model")
        arr = np.asarray(view[name], dtype=np.float64)
        if arr.shape != tuple(p.shape):
            raise ConfigError(f"observed update entry {name!r} has shape {arr.shape}, the model's is {tuple(p.shape)}")
        out[name] = torch.from_numpy(-arr / (float(weight) * float(lr)))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the attack


@dataclass
class AttackConfig:
    """iDLG settings (see the module docstring)."""

    iterations: int = 300
    optimizer: str = "lbfgs"  # "lbfgs" | "adam"
    step_size: float = 1.0  # L-BFGS lr (1 as in DLG) or Adam lr (0.1 is a usual choice)
    match: str = "l2-layer"  # "l2-layer" | "l2" | "cosine"
    tv_weight: float = 0.0
    snapshot_every: int = 0  # 0: only the initial and final state
    seed: int = 0
    history_size: int = 100
    label: str = "extract"  # "extract": iDLG, the mask is read off the output-bias gradient when the model allows
    #                         and only x' is optimised (else as "joint"); "joint": DLG, m' ~ N(0, 1) optimised with x'


    def __post_init__(self) -> None:
        if int(self.iterations) < 1:
            raise ConfigError(f"iterations must be >= 1, got {self.iterations}")
        if self.optimizer not in ("lbfgs", "adam"):
            raise ConfigError(f"optimizer must be 'lbfgs' or 'adam', got {self.optimizer!r}")
        if self.match not in MATCHES:
            raise ConfigError(f"match must be one of {MATCHES}, got {self.match!r}")
        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ConfigError(f"step_size must be > 0, got {self.step_size}")
        if not (math.isfinite(self.tv_weight) and self.tv_weight >= 0):
            raise ConfigError(f"tv_weight must be >= 0, got {self.tv_weight}")
        if self.label not in ("extract", "joint"):
            raise ConfigError(f"label must be 'extract' (iDLG) or 'joint' (DLG), got {self.label!r}")
        if int(self.snapshot_every) < 0:
            raise ConfigError(f"snapshot_every must be >= 0, got {self.snapshot_every}")


@dataclass
class AttackResult:
    """Reconstructed image ``[C, H, W]``, mask probability ``[H, W]``, snapshots ``[(iteration, image [C, H, W])]``,
    the matching loss (un-normalised) at the start of every iteration and after the last one (``final_loss``)."""

    image: np.ndarray
    mask_prob: np.ndarray
    snapshots: list[tuple[int, np.ndarray]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    iterations: int = 0
    final_loss: float = math.nan
    stopped_early: bool = False  # the optimiser produced a non-finite value; the last finite state was kept
    label_init: str = "random"  # "extracted": the mask came from the output-bias gradient (fixed); "random": m' ~ N(0, 1)
    #                             optimised jointly with x'


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: mean |x[..., i+1, j] - x[..., i, j]| + mean |x[..., i, j+1] - x[..., i, j]|."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def gradient_match_loss(dummy: Sequence[torch.Tensor], target: Sequence[torch.Tensor],
                        match: str = "l2-layer") -> torch.Tensor:
    """Distance of the dummy gradient from the target, per tensor lists in the same order.

    ``l2-layer``: ``mean_l ||d_l - t_l||^2 / ||t_l||^2`` (a tensor whose target is exactly 0 is divided by
    ``sum_l ||t_l||^2`` instead); ``l2``: ``sum_l ||d_l - t_l||^2 / sum_l ||t_l||^2`` (DLG's distance over a constant);
    ``cosine``: ``1 - <d, t> / (|d| |t|)`` of the flattened gradients."""
    if match == "l2":
        scale = sum((t * t).sum() for t in target)
        return sum(((d - t) ** 2).sum() for d, t in zip(dummy, target)) / (scale + 1e-300)
    if match == "l2-layer":
        norms = [(t * t).sum() for t in target]
        total = sum(norms)
        # a layer whose observed gradient is exactly 0 (e.g. rounded away in a float32 update) is weighted as in "l2"
        return sum(((d - t) ** 2).sum() / (n if n > 0 else total + 1e-300) for d, t, n in zip(dummy, target, norms)) / len(target)
    if match == "cosine":
        dot = sum((d * t).sum() for d, t in zip(dummy, target))
        nd = torch.sqrt(sum((d * d).sum() for d in dummy))
        nt = torch.sqrt(sum((t * t).sum() for t in target))
        return 1.0 - dot / (nd * nt + 1e-30)
    raise ConfigError(f"match must be one of {MATCHES}, got {match!r}")


#: |logit| of the (fixed) dummy mask made from the extracted label: sigmoid(6) = 0.9975
LABEL_LOGIT = 6.0


def extract_mask(model: nn.Module, target_grads: Mapping[str, torch.Tensor], image_size: Sequence[int]
                 ) -> np.ndarray | None:
    """iDLG's label extraction for segmentation: the mask ``[H, W]`` (first class) read off the signs of the per-pixel
    output bias's gradient, or None when the model has no per-pixel output bias (``model.pixel_bias``).

    With logits ``z_p = ... + b_p`` the bias gradient is ``dl/dz_p``. BCE: ``(sigmoid(z_p) - y_p) / P``, negative iff
    ``y_p = 1``. Soft Dice ``1 - (2I + s) / (P + T + s)`` with ``p = sigmoid(z)``: ``dl/dp_p = -(2 y_p (P + T + s) -
    (2I + s)) / (P + T + s)^2``, negative iff ``y_p = 1`` (as ``I <= P``); times ``sigmoid'(z_p) > 0``. So for both
    losses ``y_p = [dl/db_p < 0]`` exactly, whatever the rest of the network (ties at 0 are read as background).
    """
    name = getattr(model, "pixel_bias", None)
    if name is None or name not in target_grads:
        return None
    h, w = (int(s) for s in image_size)
    g = torch.as_tensor(target_grads[name]).detach().reshape(-1)
    if g.numel() % (h * w) != 0:
        return None
    return (g[: h * w] < 0).reshape(h, w).cpu().numpy()


def idlg_attack(model: nn.Module, target_grads: Mapping[str, torch.Tensor], image_shape: Sequence[int],
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], config: AttackConfig | None = None,
                progress: bool = False, desc: str = "iDLG") -> AttackResult:
    """Jointly reconstruct the image ``[C, H, W]`` (``image_shape``) and the mask from ``target_grads`` (name ->
    gradient of the trainable parameters, e.g. :func:`gradient_from_view`) of ``model`` at ``w0``."""
    config = config if config is not None else AttackConfig()
    t0 = time.perf_counter()
    attacker = copy.deepcopy(model).double()
    attacker.train()
    _eval_dropout(attacker)
    named = _trainable(attacker)
    missing = [n for n, _ in named if n not in target_grads]
    if missing:
        raise ConfigError(f"target gradient lacks parameters {missing[:5]}")
    params = [p for _, p in named]
    target = [torch.as_tensor(target_grads[n]).detach().double() for n, _ in named]
    if not all(torch.isfinite(t).all() for t in target):
        raise UpdateRejected("the observed gradient holds NaN/Inf")

    c, h, w = (int(s) for s in image_shape)
    gen = torch.Generator().manual_seed(int(config.seed))
    x = torch.randn(1, c, h, w, generator=gen, dtype=torch.float64).requires_grad_(True)
    m = torch.randn(1, 1, h, w, generator=gen, dtype=torch.float64)
    label_init = "random"
    variables = [x, m]
    if config.label == "extract":
        extracted = extract_mask(attacker, target_grads, (h, w))
        if extracted is not None:  # iDLG: the label is known exactly; optimise the image only
            m = torch.where(torch.from_numpy(extracted)[None, None], LABEL_LOGIT, -LABEL_LOGIT).double()
            label_init = "extracted"
            variables = [x]
    m.requires_grad_(len(variables) == 2)

    if config.optimizer == "lbfgs":
        opt = torch.optim.LBFGS(variables, lr=config.step_size, max_iter=1, max_eval=25,  # max_eval: line-search budget
                                history_size=config.history_size,
                                line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)
    else:
        opt = torch.optim.Adam(variables, lr=config.step_size)

    def raw_objective() -> torch.Tensor:
        loss = loss_fn(attacker(x), torch.sigmoid(m))
        dummy = torch.autograd.grad(loss, params, create_graph=True)
        obj = gradient_match_loss(dummy, target, config.match)
        if config.tv_weight > 0:
            obj = obj + config.tv_weight * total_variation(x)
        return obj

    # L-BFGS skips curvature pairs with y.s <= 1e-10 (an absolute threshold) and then crawls along the raw gradient:
    # optimise obj / obj(initial guess), which starts at 1 whatever the gradient's magnitude (same minimiser)
    norm = float(raw_objective().detach())
    norm = norm if math.isfinite(norm) and norm > 0 else 1.0

    def objective() -> torch.Tensor:
        opt.zero_grad()
        obj = raw_objective() / norm
        obj.backward()
        return obj

    result = AttackResult(image=np.empty(0), mask_prob=np.empty(0), label_init=label_init)
    result.snapshots.append((0, x.detach()[0].numpy().copy()))
    every = int(config.snapshot_every)
    with tqdm(range(1, int(config.iterations) + 1), desc=desc, unit="it", disable=not progress) as bar:
        for it in bar:
            before = [v.detach().clone() for v in variables]
            value = opt.step(objective)  # the objective at the start of this iteration
            value = float(value.detach()) if value is not None else math.nan
            if not (math.isfinite(value) and all(bool(torch.isfinite(v).all()) for v in variables)):
                with torch.no_grad():  # diverged: keep the last finite state and stop
                    for v, b in zip(variables, before):
                        v.copy_(b)
                result.stopped_early = True
                break
            result.losses.append(value * norm)
            bar.set_postfix(loss=f"{value:.3e}", refresh=False)
            if every and it % every == 0:
                result.snapshots.append((it, x.detach()[0].numpy().copy()))
    result.iterations = len(result.losses)
    if result.snapshots[-1][0] != result.iterations:
        result.snapshots.append((result.iterations, x.detach()[0].numpy().copy()))
    result.final_loss = float(raw_objective().detach())
    result.image = x.detach()[0].numpy().copy()
    result.mask_prob = torch.sigmoid(m.detach())[0, 0].numpy().copy()
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------------------------------
# metrics


def _as_hwc(a: np.ndarray) -> tuple[np.ndarray, int | None]:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 3:
        if a.shape[0] == 1:
            return a[0], None
        return np.moveaxis(a, 0, -1), -1
    if a.ndim == 2:
        return a, None
    raise ConfigError(f"image must be [H, W] or [C, H, W], got shape {a.shape}")


def psnr(true: np.ndarray, recon: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)`` (skimage.metrics); inf when equal."""
    from skimage.metrics import peak_signal_noise_ratio

    t, r = np.asarray(true, np.float64), np.asarray(recon, np.float64)
    if t.shape != r.shape:
        raise ConfigError(f"psnr: shapes differ {t.shape} vs {r.shape}")
    if np.array_equal(t, r):
        return math.inf
    return float(peak_signal_noise_ratio(t, r, data_range=float(data_range)))


def ssim(true: np.ndarray, recon: np.ndarray, data_range: float) -> float:
    """Structural similarity (skimage.metrics, 7x7 uniform window, the default) of [H, W] or [C, H, W] images."""
    from skimage.metrics import structural_similarity

    t, axis = _as_hwc(true)
    r, _ = _as_hwc(recon)
    if t.shape != r.shape:
        raise ConfigError(f"ssim: shapes differ {t.shape} vs {r.shape}")
    win = min(7, min(t.shape[:2]) - (1 - min(t.shape[:2]) % 2))
    return float(structural_similarity(t, r, data_range=float(data_range), channel_axis=axis, win_size=win))


def dice_binary(pred: np.ndarray, true: np.ndarray) -> float:
    """2|P & T| / (|P| + |T|) of boolean masks; 1.0 when both are empty."""
    p, t = np.asarray(pred).astype(bool), np.asarray(true).astype(bool)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def reconstruction_metrics(true_image: np.ndarray, true_mask: np.ndarray, result: AttackResult,
                           value_range: tuple[float, float] = (-1.0, 1.0)) -> dict[str, float]:
    """PSNR / SSIM of the reconstruction clipped to ``value_range`` (data_range = hi - lo) and mask Dice."""
    lo, hi = float(value_range[0]), float(value_range[1])
    rec = np.clip(result.image, lo, hi)
    true_image = np.asarray(true_image, np.float64).reshape(rec.shape)
    return {"psnr": psnr(true_image, rec, hi - lo), "ssim": ssim(true_image, rec, hi - lo),
            "mask_dice": dice_binary(result.mask_prob >= 0.5, np.asarray(true_mask).reshape(result.mask_prob.shape) > 0.5)}


def baseline_metrics(true_image: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0),
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """PSNR / SSIM of guesses made without any gradient: the constant mid-range image and a uniform random image."""
    lo, hi = float(value_range[0]), float(value_range[1])
    t = np.asarray(true_image, np.float64)
    const = np.full_like(t, 0.5 * (lo + hi))
    rand = np.random.default_rng(seed).uniform(lo, hi, size=t.shape)
    return {"constant": {"psnr": psnr(t, const, hi - lo), "ssim": ssim(t, const, hi - lo)},
            "uniform_random": {"psnr": psnr(t, rand, hi - lo), "ssim": ssim(t, rand, hi - lo)}}
