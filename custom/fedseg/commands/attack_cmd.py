"""`fedseg attack idlg`: iDLG gradient inversion of one private image and its mask from one local update.

The victim makes one plain-SGD step on one image; the attacker inverts what it observes in each threat scenario
(``fedavg``: the plain update; ``csahe-member``: the CSAHE initiator's masked ciphertext decrypted with a leaked round
key; ``dp``: the update after one round of ``fedseg.algorithms.adaptive_dp`` with a fixed, data-independent threshold,
at one or more epsilons). PSNR / SSIM of the reconstructed
image and Dice of the reconstructed mask go to ``results.json`` and ``results.md``; ``idlg.png`` shows the truth, the
reconstructions and snapshots during the optimisation (as Fig. 4B of the PPPML-HMI paper); ``reconstructions.npz``
holds the arrays. The algorithm and its choices are documented in :mod:`fedseg.attacks.idlg`.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCENARIO_CHOICES = ("fedavg", "csahe-member", "dp")
MODEL_CHOICES = ("small_cnn", "unet", "utnet")
#: packed update size above which ``--csahe-view auto`` masks the plaintext instead of encrypting (about 490 ciphertexts)
AUTO_DECRYPT_MAX_VALUES = 2_000_000
#: the hook ``--scenario dp`` calls in fedseg.algorithms.adaptive_dp (issue 5)
DP_HOOK = "idlg_mechanism"


def register(subparsers):
    p = subparsers.add_parser("attack", help="privacy attacks on what a site sends (iDLG gradient inversion)")
    sub = p.add_subparsers(dest="attack", metavar="ATTACK")
    sub.required = True
    q = sub.add_parser(
        "idlg", help="iDLG: reconstruct a training image and its mask from one local update, per threat scenario",
        description="Victim: one plain-SGD step on one private image. Attacker: inverts the update it observes "
                    "(fedavg: the update; csahe-member: the CSAHE initiator's masked vector decrypted with a leaked "
                    "key; dp: a DP-noised update). Reports PSNR/SSIM of the image and Dice of the mask.")
    q.add_argument("--scenario", nargs="+", default=["fedavg", "csahe-member"], choices=SCENARIO_CHOICES,
                   help="threat scenarios (default: fedavg csahe-member; dp needs fedseg.algorithms.adaptive_dp)")
    q.add_argument("--model", default="small_cnn", choices=MODEL_CHOICES,
                   help="small_cnn (default: DLG's LeNet as a segmentation net, no BatchNorm: the attack works best "
                        "there); unet / utnet (BatchNorm in train mode; utnet ~14 M parameters is slow on a CPU)")
    q.add_argument("--model-args", type=json.loads, default=None,
                   help="JSON object of model options, e.g. '{\"head\": \"conv\"}' (small_cnn: width, head, "
                        "activation) or '{\"base_chan\": 4}' (utnet)")
    q.add_argument("--image-size", type=int, default=32, help="square image size the slice is resized to (default 32)")
    q.add_argument("--iterations", type=int, default=300, help="optimiser iterations per scenario (default 300)")
    q.add_argument("--seed", type=int, default=0, help="seed of the global model's init and of the dummy data")
    q.add_argument("--data", default="builtin-lits",
                   help="builtin-lits (default: a tumour slice of the built-in synthetic LiTS, site-1 train), "
                        "builtin-covid (when the COVID data module exists), synthetic (a generated phantom), or a "
                        "file: PATH.nii[.gz] (CT in HU, needs --mask) or PATH.png/.jpg (needs --mask)")
    q.add_argument("--mask", type=Path, default=None, help="mask file for --data PATH (same shape; nonzero = lesion)")
    q.add_argument("--index", type=int, default=None,
                   help="sample index (built-in data) or axial slice (NIfTI); default: the largest lesion")
    q.add_argument("--loss", default="dice", choices=["dice", "bce"],
                   help="the victim's training loss (default dice: fedseg's SoftDiceLoss)")
    q.add_argument("--lr", type=float, default=0.1,
                   help="the victim's SGD learning rate (default 0.1; small rates round the early layers' update "
                        "away in float32, see fedseg.attacks.idlg)")
    q.add_argument("--optimizer", default="lbfgs", choices=["lbfgs", "adam"], help="attack optimiser (default lbfgs)")
    q.add_argument("--step-size", type=float, default=None, help="optimiser step size (default 1 for lbfgs, 0.1 for adam)")
    q.add_argument("--match", default="l2-layer", choices=["l2-layer", "l2", "cosine"],
                   help="gradient-matching loss (default l2-layer: per-tensor normalised squared distance)")
    q.add_argument("--tv-weight", type=float, default=0.0, help="total-variation prior weight (default 0)")
    q.add_argument("--label", default="extract", choices=["extract", "joint"],
                   help="extract (iDLG: mask read off the output-bias gradient when the model has a per-pixel bias, "
                        "else joint) or joint (DLG: optimise the mask logits with the image)")
    q.add_argument("--sigma", type=float, default=100.0,
                   help="CSAHE mask standard deviation (default 100, the paper's minimum: the attacker's best case)")
    q.add_argument("--ring-weight", type=float, default=1.0 / 3.0,
                   help="the initiator's aggregation weight n_I / sum n (default 1/3: three equal sites)")
    q.add_argument("--csahe-view", default="auto", choices=["auto", "decrypt", "plaintext"],
                   help="decrypt: real Initiator.start() ciphertexts decrypted with its key; plaintext: the same "
                        f"mask added without CKKS; auto: decrypt up to {AUTO_DECRYPT_MAX_VALUES:,} values")
    q.add_argument("--dp-epsilon", type=float, nargs="+", default=[1.0],
                   help="per-round epsilon(s) of the DP mechanism (scenario dp; several values: one row each, named "
                        "dp-eps-<value>; default 1)")
    q.add_argument("--dp-mechanism", default="laplace", choices=["laplace", "gaussian"],
                   help="laplace (default: L1 clipping, the paper's) or gaussian (L2 clipping, analytic sigma)")
    q.add_argument("--dp-clip", type=float, default=1.0,
                   help="fixed clipping threshold in the mechanism's norm (default 1; a constant: a threshold taken "
                        "from the update itself would leak)")
    q.add_argument("--dp-delta", type=float, default=1e-5, help="delta of the gaussian mechanism (default 1e-5)")
    q.add_argument("--snapshot-every", type=int, default=None,
                   help="keep a reconstruction snapshot every N iterations (default iterations / 5)")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    q.add_argument("--out", type=Path, required=True, help="output folder")
    q.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------------------------------
# the target image


@dataclass
class Target:
    """One private training sample: image [C, S, S] float32, mask [S, S] {0, 1} float32, the normalised intensity
    range and a description of where it came from."""

    image: Any
    mask: Any
    value_range: tuple[float, float]
    info: dict[str, Any] = field(default_factory=dict)


@contextmanager
def _without_env(name: str):
    old = os.environ.pop(name, None)
    try:
        yield
    finally:
        if old is not None:
            os.environ[name] = old


def _resize(image, mask, size: int):
    """[C, H, W] image (bilinear, antialiased when shrinking) and [H, W] mask (same interpolation >= 0.5), as LiTS."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image.astype(np.float32), (mask > 0).astype(np.float32)
    down = size < max(h, w)
    with torch.no_grad():
        x = F.interpolate(torch.from_numpy(np.ascontiguousarray(image, np.float32))[None], size=(size, size),
                          mode="bilinear", align_corners=False, antialias=down)[0]
        m = F.interpolate(torch.from_numpy((mask > 0).astype(np.float32))[None, None], size=(size, size),
                          mode="bilinear", align_corners=False, antialias=down)[0, 0] >= 0.5
    return x.numpy(), m.numpy().astype(np.float32)


def _largest(masks) -> int:
    import numpy as np

    areas = np.asarray(masks).reshape(len(masks), -1).sum(axis=1)
    return int(np.argmax(areas))


def _check_index(index: int, n: int, what: str) -> int:
    from fedseg.errors import CommandError

    if not 0 <= index < n:
        raise CommandError(f"--index {index} is out of range: {what} has {n} (0..{n - 1})")
    return index


def _value_range(image) -> tuple[float, float]:
    lo, hi = float(image.min()), float(image.max())
    if lo >= -1.0 and hi <= 1.0:
        return (-1.0, 1.0) if lo < 0 else (0.0, 1.0)
    return lo, hi


def _from_dataset(ds, index: int | None, size: int, info: dict[str, Any]) -> Target:
    import numpy as np

    from fedseg.errors import DataError

    if len(ds) == 0:
        raise DataError(f"{info.get('source')}: the data set is empty; no slice to attack")
    i = _largest(ds.masks) if index is None else _check_index(index, len(ds), "the data set")
    if hasattr(ds, "batch"):
        x, y = ds.batch(np.array([i]))
        image, mask = x[0].numpy(), y[0].numpy().reshape(x.shape[-2:])
    else:
        sample = ds[i]
        image, mask = sample["image"].numpy(), sample["mask"].numpy()[0]
    image, mask = _resize(np.asarray(image, np.float32), np.asarray(mask), size)
    info.update(index=i, samples=len(ds))
    return Target(image, mask, _value_range(image), info)


def _builtin_lits(size: int, index: int | None) -> Target:
    from fedseg.data.config import DataSource
    from fedseg.data.lits import LiTSPreprocessing, load_lits_site

    source = DataSource(dataset="lits", root=None, split=None, centre=None, cache_dir=None,
                        origin="built-in synthetic LiTS (fedseg attack idlg)")
    ds = load_lits_site(source, "site-1", "train", LiTSPreprocessing(image_size=size), progress=True)
    t = _from_dataset(ds, index, size, {"source": "built-in synthetic LiTS, site-1 train (tumour slices)"})
    t.value_range = (-1.0, 1.0)  # LiTS: HU window [-200, 200] mapped to [-1, 1]
    record = ds.manifest[t.info["index"]]
    t.info.update(volume=record.get("volume"), slice=record.get("slice_index"),
                  tumour_pixels_native=record.get("tumour_pixels"))
    return t


def _builtin_covid(size: int, index: int | None) -> Target:
    """The axial (xy) 5-slice stack [5, S, S] and central mask of a 2.5D sample of the built-in COVID data (site-1
    train, cube side ``size``); intensities: the lung window mapped to [0, 1]."""
    import numpy as np

    from fedseg import sitedata
    from fedseg.errors import CommandError

    if "covid" not in sitedata.DATASETS:
        raise CommandError("--data builtin-covid needs the COVID data set (fedseg.sitedata entry 'covid'), which is "
                           "not in this build; use --data builtin-lits or a file")
    if size < 16:
        raise CommandError(f"--data builtin-covid needs --image-size >= 16 (the cube side), got {size}")
    with _without_env("FEDSEG_DATA_CONFIG"):  # built-in means built-in, whatever the environment configures
        ds, _ = sitedata.load_site_data("covid", "site-1", "train", {"volume_size": size}, progress=True)
    if len(ds) == 0:
        raise CommandError("the built-in COVID data of site-1 has no training sample")
    i = _largest(np.asarray(ds.masks)[:, 0]) if index is None else _check_index(index, len(ds), "the data set")
    x, y = ds.batch(np.array([i]))
    image, mask = x[0, 0].numpy(), y[0, 0].numpy()
    lo, hi = (0.0, 1.0) if ds.prep.intensity == "window" else _value_range(image)
    return Target(image.astype(np.float32), (mask > 0).astype(np.float32), (lo, hi),
                  {"source": "built-in synthetic COVID, site-1 train, axial 5-slice stack (2.5D)", "index": i,
                   "samples": len(ds)})


def _synthetic(size: int, seed: int) -> Target:
    """A CT-like phantom in [-1, 1]: air, a body ellipse, an organ, a darker round lesion (the mask), mild texture."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    image = np.full((size, size), -1.0)
    image[(xx / 0.85) ** 2 + (yy / 0.65) ** 2 <= 1] = -0.2
    organ = ((xx + 0.25) / 0.45) ** 2 + ((yy - 0.05) / 0.35) ** 2 <= 1
    image[organ] = 0.35
    cx, cy, r = -0.3 + rng.uniform(-0.05, 0.05), 0.05 + rng.uniform(-0.05, 0.05), 0.16
    mask = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.float32)
    image[mask > 0] = -0.05
    image = np.clip(image + rng.normal(0, 0.03, image.shape) * (image > -1), -1, 1).astype(np.float32)
    return Target(image[None], mask, (-1.0, 1.0), {"source": f"synthetic phantom (seed {seed})"})


def _load_mask_file(path: Path | None, data: Path):
    import numpy as np

    from fedseg.errors import CommandError, DataError

    if path is None:
        raise CommandError(f"--data {data} needs --mask PATH (the lesion mask of that image; nonzero = lesion)")
    if not path.is_file():
        raise CommandError(f"mask file {path} does not exist")
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            return np.asarray(nib.load(str(path)).dataobj) > 0
        from skimage import io

        m = np.asarray(io.imread(str(path)))
    except Exception as e:
        raise DataError(f"cannot read mask {path}: {e}") from e
    if m.ndim == 3:
        m = m[..., :3].max(axis=-1)
    return m > (m.max() / 2 if m.max() > 1 else 0)


def _from_file(path: Path, mask_path: Path | None, size: int, index: int | None) -> Target:
    import numpy as np

    from fedseg.errors import CommandError, DataError

    if not path.is_file():
        raise CommandError(f"--data {path}: no such file (use builtin-lits, builtin-covid, synthetic or a "
                           ".nii/.nii.gz/.png/.jpg file)")
    name = path.name.lower()
    mask = _load_mask_file(mask_path, path)
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        from fedseg.data.lits import LiTSPreprocessing

        try:
            vol = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
        except Exception as e:
            raise DataError(f"cannot read NIfTI {path}: {e}") from e
        if vol.ndim == 2:
            vol, mask = vol[..., None], mask[..., None] if mask.ndim == 2 else mask
        if vol.ndim != 3 or mask.shape != vol.shape:
            raise DataError(f"{path} is {vol.shape} and the mask {mask_path} is {mask.shape}; expected one 3-D (or "
                            "2-D) volume and a mask of the same shape")
        k = _largest(np.moveaxis(mask, -1, 0)) if index is None else _check_index(index, vol.shape[-1], "the volume")
        prep = LiTSPreprocessing()
        image = prep.scale(vol[..., k])[None]
        info = {"source": str(path), "mask": str(mask_path), "slice": k,
                "intensity": f"HU clipped to [{prep.hu_min:g}, {prep.hu_max:g}] -> [-1, 1]"}
        img, m = _resize(image, mask[..., k], size)
        return Target(img, m, (-1.0, 1.0), info)
    if name.endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
        from skimage import io

        try:
            raw = np.asarray(io.imread(str(path)))
        except Exception as e:
            raise DataError(f"cannot read image {path}: {e}") from e
        grey = raw[..., :3].mean(axis=-1) if raw.ndim == 3 else raw.astype(np.float64)
        top = 255.0 if raw.dtype == np.uint8 else (65535.0 if raw.dtype == np.uint16 else max(float(grey.max()), 1.0))
        if mask.shape != grey.shape:
            raise DataError(f"image {path} is {grey.shape[:2]} but the mask {mask_path} is {mask.shape}")
        image = (grey / top * 2.0 - 1.0).astype(np.float32)[None]
        img, m = _resize(image, mask, size)
        return Target(img, m, (-1.0, 1.0), {"source": str(path), "mask": str(mask_path),
                                            "intensity": f"grey / {top:g} -> [-1, 1]"})
    raise CommandError(f"--data {path}: unknown file type; use .nii/.nii.gz (CT in HU) or .png/.jpg")


def load_target(data: str, size: int, index: int | None = None, mask: Path | None = None, seed: int = 0) -> Target:
    """The private sample the victim trains on, resized to ``size`` (see ``--data``)."""
    from fedseg.errors import CommandError

    if size < 8:
        raise CommandError(f"--image-size must be >= 8, got {size}")
    if data == "builtin-lits":
        return _builtin_lits(size, index)
    if data == "builtin-covid":
        return _builtin_covid(size, index)
    if data == "synthetic":
        return _synthetic(size, seed)
    return _from_file(Path(data).expanduser(), mask, size, index)


# ---------------------------------------------------------------------------------------------------------------------
# scenarios


def dp_mechanism(epsilon: float, seed: int, mechanism: str = "laplace", clip: float = 1.0, delta: float = 1e-5):
    """The DP mechanism of scenario ``dp``: ``fedseg.algorithms.adaptive_dp.idlg_mechanism(epsilon=, seed=,
    mechanism=, clip=, delta=)``, a callable ``update dict -> noised update dict`` (one round, fixed threshold ``clip``
    in L1 for laplace / L2 for gaussian, replace adjacency; its ``last_report`` holds the noise scale).
    CommandError when that module is missing from the build or a setting is out of range."""
    import importlib

    from fedseg.errors import CommandError

    try:
        module = importlib.import_module("fedseg.algorithms.adaptive_dp")
    except ImportError:
        raise CommandError("--scenario dp needs fedseg.algorithms.adaptive_dp (issue 5), which this build lacks; "
                           "reinstall fedseg (pip install -e .) or run without dp") from None
    hook = getattr(module, DP_HOOK, None)
    if hook is None:
        raise CommandError(f"--scenario dp: fedseg.algorithms.adaptive_dp has no {DP_HOOK}(epsilon=, seed=) returning "
                           "a mechanism (update dict -> noised update dict); see fedseg.attacks.idlg.dp_view")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise CommandError(f"--dp-epsilon must be > 0, got {epsilon}")
    if not (math.isfinite(clip) and clip > 0):
        raise CommandError(f"--dp-clip must be > 0, got {clip}")
    if not 0 < delta < 1:
        raise CommandError(f"--dp-delta must be in (0, 1), got {delta}")
    return hook(epsilon=float(epsilon), seed=int(seed), mechanism=mechanism, clip=float(clip), delta=float(delta))


def dp_scenarios(epsilons) -> dict[str, float]:
    """Row name -> epsilon: ``dp`` for one epsilon, ``dp-eps-<epsilon>`` for each of several."""
    eps = list(dict.fromkeys(float(e) for e in epsilons))
    return {"dp": eps[0]} if len(eps) == 1 else {f"dp-eps-{e:g}": e for e in eps}


def dp_view_info(update, view, epsilon: float, report: dict[str, Any] | None) -> dict[str, Any]:
    """What the DP row reports: the mechanism's public report (threshold, sensitivity, noise scale) and, for the
    evaluation only, the signal-to-noise ratios the attacker faces: |c Delta|_2 / |view - c Delta|_2 over the whole
    update and over its first tensor (the first layer, which carries the image detail), c = the clipping factor.
    The raw norms are evaluation numbers: the mechanism itself never releases them."""
    import numpy as np

    report = report or {}
    norm = report.get("norm", "l1")
    d = {k: np.asarray(v, np.float64) for k, v in update.items()}
    l1 = float(sum(np.abs(v).sum() for v in d.values()))
    l2 = float(math.sqrt(sum(np.square(v).sum() for v in d.values())))
    clip = report.get("clip")
    total = l1 if norm == "l1" else l2
    c = min(1.0, clip / total) if isinstance(clip, (int, float)) and total > 0 else 1.0

    def snr(keys):
        sig = math.sqrt(sum(float(np.square(c * d[k]).sum()) for k in keys))
        noise = math.sqrt(sum(float(np.square(np.asarray(view[k], np.float64) - c * d[k]).sum()) for k in keys))
        return sig / noise if noise > 0 else math.inf

    first = next(iter(d))
    return {"epsilon": float(epsilon), "mechanism": report.get("mechanism"), "norm": norm, "clip": clip,
            "delta": report.get("delta"), "sensitivity": report.get("sensitivity"),
            "noise_scale": report.get("noise_scale"), "update_l1": l1, "update_l2": l2, "clip_factor": c,
            "snr": snr(list(d)), "first_tensor": first, "first_tensor_snr": snr([first]),
            "hook": f"fedseg.algorithms.adaptive_dp.{DP_HOOK}"}


def _describe(scenario: str, info: dict[str, Any]) -> str:
    if scenario == "fedavg":
        return "-Delta / lr (the plain update)"
    if scenario == "csahe-member":
        how = (f"decrypted from {info['ciphertexts']} ciphertexts" if info["method"] == "decrypt"
               else "plaintext + CSPRNG mask (no CKKS)")
        return (f"-(w_I Delta + R) / (w_I lr), R ~ N(0, {info['sigma']:g}^2), w_I = {info['weight']:.3g}, {how}; "
                f"|w_I Delta| / |R| = {info['snr']:.1e}")
    noise = "b" if info.get("mechanism") == "laplace" else "sigma"
    clip = info.get("clip")
    clip_s = f"{info.get('norm', '').upper()} clip {clip:g}, " if isinstance(clip, (int, float)) else ""
    scale = info.get("noise_scale")
    scale_s = f"{noise} = {scale:.3g}, " if isinstance(scale, (int, float)) else ""
    snr = info.get("snr")
    snr_s = f"; |c Delta| / |noise| = {snr:.1e}" if isinstance(snr, (int, float)) else ""
    return f"-DP(Delta) / lr: {info.get('mechanism')} {clip_s}{scale_s}epsilon = {info.get('epsilon'):g}{snr_s}"


def run(args) -> int:
    import torch

    from fedseg.attacks import idlg
    from fedseg.errors import CommandError

    if args.iterations < 1:
        raise CommandError(f"--iterations must be >= 1, got {args.iterations}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CommandError(f"--lr must be > 0, got {args.lr}")
    if not 0 < args.ring_weight <= 1:
        raise CommandError(f"--ring-weight must be in (0, 1], got {args.ring_weight}")
    if args.model_args is not None and not isinstance(args.model_args, dict):
        raise CommandError("--model-args must be a JSON object, e.g. '{\"width\": 16}'")
    scenarios = list(dict.fromkeys(args.scenario))
    mechanisms = {}
    if "dp" in scenarios:  # fail before any work
        eps_list = args.dp_epsilon if isinstance(args.dp_epsilon, (list, tuple)) else [args.dp_epsilon]
        mechanisms = {name: (eps, dp_mechanism(eps, args.seed, args.dp_mechanism, args.dp_clip, args.dp_delta))
                      for name, eps in dp_scenarios(eps_list).items()}
        i = scenarios.index("dp")
        scenarios[i:i + 1] = list(mechanisms)
    step = args.step_size if args.step_size is not None else (1.0 if args.optimizer == "lbfgs" else 0.1)
    every = args.snapshot_every if args.snapshot_every is not None else max(1, args.iterations // 5)
    config = idlg.AttackConfig(iterations=args.iterations, optimizer=args.optimizer, step_size=step, match=args.match,
                               tv_weight=args.tv_weight, snapshot_every=every, seed=args.seed, label=args.label)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(int(args.threads))
    try:
        return _run(args, scenarios, mechanisms, config)
    finally:
        torch.set_num_threads(threads)


def _run(args, scenarios, mechanisms, config) -> int:
    import numpy as np
    import torch

    from fedseg import __version__
    from fedseg.attacks import idlg
    from fedseg.errors import CommandError

    target = load_target(args.data, args.image_size, args.index, args.mask, args.seed)
    c, s, _ = target.image.shape
    if float(target.mask.sum()) == 0:
        print("warning: the chosen slice's mask is empty at this image size; the mask Dice is then 1 only for an "
              "empty reconstruction")
    model = idlg.build_attack_model(args.model, in_channels=c, num_classes=1, image_size=s, seed=args.seed,
                                    **(args.model_args or {}))
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x = torch.from_numpy(target.image)[None]
    y = torch.from_numpy(target.mask)[None, None]
    try:
        with torch.no_grad():
            model.eval()(x)
    except RuntimeError as e:
        raise CommandError(f"model {args.model} cannot take a {c}x{s}x{s} image ({e}); change --image-size") from e
    loss_fn = idlg.make_loss(args.loss)
    update = idlg.local_sgd_update(model, x, y, loss_fn, args.lr)
    lo, hi = target.value_range
    print(f"target: {target.info.get('source')} ({_where(target.info)}), "
          f"{c}x{s}x{s}, {int(target.mask.sum())} lesion pixels; model {args.model}: {n_params:,} parameters")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {}
    for scenario in scenarios:
        info: dict[str, Any] = {}
        if scenario == "fedavg":
            view, weight = idlg.fedavg_view(update), 1.0
        elif scenario == "csahe-member":
            size = sum(int(np.size(v)) for v in update.values())
            method = args.csahe_view if args.csahe_view != "auto" else (
                "decrypt" if size <= AUTO_DECRYPT_MAX_VALUES else "plaintext")
            view, info = idlg.csahe_member_view(update, args.ring_weight, args.sigma, method)
            weight = args.ring_weight
        else:
            epsilon, mechanism = mechanisms[scenario]
            view, weight = idlg.dp_view(update, mechanism), 1.0
            info = dp_view_info(update, view, epsilon, getattr(mechanism, "last_report", None))
        grads = idlg.gradient_from_view(model, view, args.lr, weight)
        result = idlg.idlg_attack(model, grads, target.image.shape, loss_fn, config, progress=True, desc=scenario)
        metrics = idlg.reconstruction_metrics(target.image, target.mask, result, target.value_range)
        results[scenario] = result
        rows[scenario] = {**metrics, "label": result.label_init, "iterations": result.iterations,
                          "stopped_early": result.stopped_early, "final_match_loss": result.final_loss,
                          "seconds": round(result.seconds, 2), "observed": _describe(scenario, info), "view": info}
    baselines = idlg.baseline_metrics(target.image, target.value_range, seed=args.seed)

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("func",)}
    summary = {
        "attack": "iDLG (Zhao et al. 2020), segmentation: image by gradient matching, mask by label extraction or "
                  "joint optimisation",
        "settings": settings,
        "attack_config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "data": {**target.info, "image_shape": [c, s, s], "lesion_pixels": int(target.mask.sum()),
                 "value_range": [lo, hi]},
        "model": {"name": args.model, "args": args.model_args or {}, "parameters": n_params},
        "victim": {"loss": args.loss, "lr": args.lr, "steps": 1, "batch": 1, "optimizer": "SGD"},
        "metrics": "PSNR / SSIM (skimage.metrics, data_range = value range) of the reconstruction clipped to the value "
                   "range vs the true image; Dice of sigmoid(mask logits) >= 0.5 vs the true mask",
        "scenarios": rows,
        "baselines": baselines,
        "versions": {"fedseg": __version__, "torch": torch.__version__},
    }
    (out / "results.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    table = _markdown(summary)
    (out / "results.md").write_text(table)
    np.savez_compressed(out / "reconstructions.npz", true_image=target.image, true_mask=target.mask,
                        **{f"{k}_image": r.image for k, r in results.items()},
                        **{f"{k}_mask_prob": r.mask_prob for k, r in results.items()},
                        **{f"{k}_snapshots": np.stack([im for _, im in r.snapshots]) for k, r in results.items()},
                        **{f"{k}_snapshot_iterations": np.array([i for i, _ in r.snapshots]) for k, r in results.items()})
    plot_reconstructions(target, results, rows, out / "idlg.png",
                         title=f"iDLG on {args.model} ({n_params:,} params), {s}x{s}, {args.loss} loss, lr {args.lr:g}")
    print(table, end="")
    print(f"results written to {out}")
    return 0


def _jsonable(obj):
    """Plain JSON types; non-finite floats become null."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def _where(d: dict[str, Any]) -> str:
    parts = [f"sample {d['index']}"] if d.get("index") is not None else []
    if d.get("volume"):
        parts.append(f"{d['volume']}")
    if d.get("slice") is not None:
        parts.append(f"slice {d['slice']}")
    return " ".join(parts) or "the image"


def _markdown(summary: dict[str, Any]) -> str:
    d, m, v = summary["data"], summary["model"], summary["victim"]
    cfg = summary["attack_config"]
    lines = [
        f"# iDLG gradient inversion: {m['name']} ({m['parameters']:,} parameters)\n",
        (f"Target: {d.get('source')}, {_where(d)}, image {d['image_shape']}, "
        f"{d['lesion_pixels']} lesion pixels, intensities in {d['value_range']}. Victim: one plain-SGD step, batch 1, "
        f"{v['loss']} loss, lr {v['lr']:g}. Attack: {cfg['optimizer']} (step {cfg['step_size']:g}), match "
        f"{cfg['match']}, TV weight {cfg['tv_weight']:g}, {cfg['iterations']} iterations, seed {cfg['seed']}.\n"),
        "| scenario | the attacker inverts | PSNR (dB) | SSIM | mask Dice | mask from | iterations | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["scenarios"].items():
        observed = r["observed"].replace("|", "\\|")
        lines.append(f"| {name} | {observed} | {_fmt(r['psnr'])} | {_fmt(r['ssim'], 3)} | "
                     f"{_fmt(r['mask_dice'], 3)} | {r['label']} | {r['iterations']} | {_fmt(r['seconds'], 1)} |")
    names = {"constant": "no gradient: constant mid-range image", "uniform_random": "no gradient: uniform random image"}
    for key, b in summary["baselines"].items():
        lines.append(f"| {names.get(key, key)} | nothing | {_fmt(b['psnr'])} | {_fmt(b['ssim'], 3)} | | | | |")
    lines.append("")
    lines.append("PSNR / SSIM: skimage.metrics on the reconstruction clipped to the intensity range (data_range = its "
                 "width). Mask from: extracted = read off the per-pixel output-bias gradient (iDLG), random = "
                 "optimised jointly from random logits (DLG).")
    return "\n".join(lines) + "\n"


def plot_reconstructions(target: Target, results: dict[str, Any], rows: dict[str, dict[str, Any]], out_png: Path,
                         title: str = "") -> Path:
    """Truth (image, mask) in the first row; per scenario the snapshots of the dummy image during the attack, the
    final reconstruction and the reconstructed mask probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = target.value_range
    ch = target.image.shape[0] // 2  # the centre channel for multi-channel (2.5D) images

    n_cols = max([len(r.snapshots) for r in results.values()] + [2]) + 1
    n_rows = 1 + len(results)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.7 * n_cols + 0.8, 1.9 * n_rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    axes[0, 0].imshow(target.image[ch], cmap="gray", vmin=lo, vmax=hi)
    axes[0, 0].set_title("true image", fontsize=8)
    axes[0, 0].set_ylabel("truth", fontsize=9)
    axes[0, 1].imshow(target.mask, cmap="magma", vmin=0, vmax=1)
    axes[0, 1].set_title("true mask", fontsize=8)
    for row, (name, res) in enumerate(results.items(), start=1):
        metrics = rows[name]
        for col, (it, im) in enumerate(res.snapshots):
            ax = axes[row, col]
            ax.imshow(im[ch].clip(lo, hi), cmap="gray", vmin=lo, vmax=hi)
            last = col == len(res.snapshots) - 1
            ax.set_title(f"it {it}" + (f"\nPSNR {_fmt(metrics['psnr'], 1)} SSIM {_fmt(metrics['ssim'])}" if last else ""),
                         fontsize=7)
        axes[row, 0].set_ylabel(name, fontsize=9)
        ax = axes[row, n_cols - 1]
        ax.imshow(res.mask_prob, cmap="magma", vmin=0, vmax=1)
        ax.set_title(f"mask ({res.label_init})\nDice {_fmt(metrics['mask_dice'])}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
