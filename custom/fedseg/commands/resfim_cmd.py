"""`fedseg resfim restyle`: show what ResFIM's spectral style transfer does to a site's image.

Takes one training image of ``--site`` and writes ``restyle.png``: the image, then the same image in each other
site's style (the low-frequency amplitude window replaced, the image's own phase kept; what the site's Fisher estimate
sees), and under each the window's log-amplitude. ``styles.npz`` holds the style bank used (``StyleBank.to_dict()``).

Where the styles come from:

- ``--bank style_bank.npz``: the bank a ResFIM run exchanged (the server writes it to its run folder, every site
  holds it). This is how a hospital looks at its own image in the consortium's styles.
- without ``--bank``: every site's style is computed here from each site's training data (the job's sites
  ``site-1`` .. ``site-<min_clients>``, the same rows and settings a run uses), which needs every site's data on this
  machine: the built-in synthetic data, or a pooled development copy named in the data configuration.

Images are shown per channel min-max scaled over the whole row (the data is ImageNet-normalised; the scaling is the
same for every panel, so colour casts compare).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedseg.errors import CommandError


def register(subparsers):
    p = subparsers.add_parser("resfim", help="ResFIM tools: restyle a site's image to every other site's style")
    sub = p.add_subparsers(dest="resfim_command", metavar="ACTION")
    sub.required = True
    r = sub.add_parser("restyle", help="write restyle.png: one training image of a site in each other site's style")
    r.add_argument("--job", default="resfim_polypgen", help="a ResFIM job (its data and style settings)")
    r.add_argument("--site", default="site-1", help="the site whose image is restyled")
    r.add_argument("--index", type=int, default=None,
                   help="row of the site's training data (default: the first row of its style sample)")
    r.add_argument("--bank", type=Path, default=None, help="style_bank.npz of a run (default: compute every "
                   "site's style from the data configuration)")
    r.add_argument("--data-config", type=Path, default=None, help="data configuration JSON (sets FEDSEG_DATA_CONFIG)")
    r.add_argument("--data-args", type=json.loads, default=None, help="JSON object overriding the job's data_args")
    r.add_argument("--out", type=Path, required=True, help="output folder")
    r.set_defaults(func=run_restyle)


def _settings(job):
    from fedseg.algorithms.personalization import PersonalizationConfig

    if job.personalization != "resfim":
        raise CommandError(f"job {job.name!r} does not use ResFIM (personalization={job.personalization!r}); use "
                           "resfim_polypgen or a job with personalization='resfim'")
    return PersonalizationConfig(method="resfim", **dict(job.personalization_args or {}))


def _images(data, rows) -> np.ndarray:
    from fedseg.evaluation import image_batch

    if hasattr(data, "batch"):
        x, _ = data.batch(np.asarray(rows))
        return x.numpy()
    return image_batch(data, np.asarray(rows)).numpy()


def build_bank(job, cfg, sites):
    """Every site's style from its own training data, exactly as the sites compute it in a run."""
    from tqdm import tqdm

    from fedseg.algorithms.personalization import STYLE_SALT, sample_rows
    from fedseg.algorithms.spectral import StyleBank
    from fedseg.sitedata import load_site_data

    bank = StyleBank(cfg.beta)
    for site in tqdm(sites, desc="site styles", unit="site"):
        data, _ = load_site_data(job.dataset, site, "train", job.data_args)
        rows = sample_rows(len(data.delta), cfg.style_samples, cfg.seed, STYLE_SALT)
        bank.add_images(site, list(_images(data, rows)))
    return bank


def _display(images: list[np.ndarray]) -> list[np.ndarray]:
    """(H, W, 3) or (H, W) arrays in [0, 1], one min-max per channel over all panels."""
    stack = np.stack(images).astype(np.float64)  # [P, C, H, W]
    lo = stack.min(axis=(0, 2, 3), keepdims=True)
    hi = stack.max(axis=(0, 2, 3), keepdims=True)
    scaled = (stack - lo) / np.where(hi > lo, hi - lo, 1.0)
    return [np.transpose(s, (1, 2, 0)) if s.shape[0] == 3 else s[0] for s in scaled]


def plot_restyle(image: np.ndarray, restyled: dict[str, np.ndarray], bank, site: str, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedseg.algorithms.spectral import low_freq_style

    names = [site] + list(restyled)
    panels = _display([image] + list(restyled.values()))
    fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 5.4), squeeze=False)
    for i, (name, panel) in enumerate(zip(names, panels)):
        ax = axes[0][i]
        ax.imshow(panel, cmap=None if panel.ndim == 3 else "gray")
        ax.set_title(f"{site} (original)" if i == 0 else f"in {name}'s style", fontsize=9)
        ax.axis("off")
        style = bank.style(name) if name in bank else low_freq_style(image, bank.beta)
        amp = np.log1p(style.mean(axis=0) if style.ndim == 3 else style)
        ax = axes[1][i]
        ax.imshow(amp, cmap="magma")
        ax.set_title(f"{name}: log amplitude, {style.shape[-1]}x{style.shape[-1]} window", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"ResFIM spectral transfer (beta {bank.beta}): low-frequency amplitude swapped, phase kept",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def run_restyle(args) -> int:
    from fedseg.commands.evaluate_cmd import _env
    from fedseg.jobs.recipes import JOBS, override

    if args.job not in JOBS:
        raise CommandError(f"unknown job {args.job!r}; see `fedseg jobs list`")
    job = JOBS[args.job]
    if args.data_args:
        job = override(job, {f"data_args.{k}": v for k, v in args.data_args.items()})
    cfg = _settings(job)
    with _env("FEDSEG_DATA_CONFIG", str(args.data_config) if args.data_config is not None else None):
        return _restyle(args, job, cfg)


def _restyle(args, job, cfg) -> int:
    from fedseg.algorithms.personalization import STYLE_SALT, sample_rows
    from fedseg.algorithms.spectral import StyleBank
    from fedseg.sitedata import load_site_data

    if args.bank is not None:
        try:
            bank = StyleBank.from_dict(dict(np.load(args.bank)))
        except (OSError, ValueError) as e:
            raise CommandError(f"{args.bank}: not a style bank file ({e}); use the style_bank.npz of a ResFIM run") from e
    else:
        bank = build_bank(job, cfg, [f"site-{i}" for i in range(1, job.min_clients + 1)])
    data, _ = load_site_data(job.dataset, args.site, "train", job.data_args)
    rows = sample_rows(len(data.delta), cfg.style_samples, cfg.seed, STYLE_SALT)
    index = int(rows[0]) if args.index is None else int(args.index)
    if not 0 <= index < len(data.delta):
        raise CommandError(f"--index {index} is outside {args.site}'s {len(data.delta)} training rows")
    image = _images(data, [index])[0].astype(np.float64)
    others = bank.others(args.site) if args.site in bank else bank.sites
    if not others:
        raise CommandError(f"the style bank holds no style other than {args.site}'s ({bank.sites})")
    restyled = {other: bank.transfer(image, other, lam=cfg.lam) for other in others}
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "styles.npz", **bank.to_dict())
    png = plot_restyle(image, restyled, bank, args.site, args.out / "restyle.png")
    shift = {o: float(np.abs(r - image).mean()) for o, r in restyled.items()}
    (args.out / "restyle.json").write_text(json.dumps({
        "job": job.name, "site": args.site, "row": index, "beta": bank.beta, "lam": cfg.lam, "sites": bank.sites,
        "style_shape": list(bank.style(bank.sites[0]).shape), "mean_abs_change": shift,
        "bank": str(args.bank) if args.bank else "computed from each site's training data"}, indent=2))
    print(f"{args.site} row {index} restyled to {len(restyled)} site styles (beta {bank.beta}): {png}")
    return 0
