"""Non-federated baselines of the PPPML-HMI comparison (paper 001, section IV-B, Fig. 3): independent (local-only)
training per site and centralized (pooled) training, on exactly an FL job's data and model.

Pure code (torch, numpy, matplotlib), no nvflare import; ``fedseg baseline`` (:mod:`fedseg.commands.baseline_cmd`)
is the command.

Settings (:func:`settings_from_job`) come from the job recipe: dataset, data_args, model, model_args, in_channels,
num_classes, batch_size, weight_decay, augment, device, seed, num_threads and max_steps_per_round. Differences to the
FL run, all deliberate:

* **Epochs**: by default ``num_rounds x local_epochs`` of the job, "the same total number of epochs" as the FL
  training (the paper's comparison). ``max_steps_per_round`` (a smoke-test cap) caps the steps of every baseline
  epoch.
* **Optimiser**: AdamW at the job's ``lr`` and ``weight_decay``, trained continuously: one AdamW state for the whole
  run (no reset between epochs, unlike FL rounds, where the state is reset every round). For a Per-FedAvg job
  (``algorithm="perfedavg"``) the learning rate is the job's ``beta`` -- the paper's local learning rate (its outer
  step size) -- not ``lr``, which Per-FedAvg jobs do not use. Training is :class:`fedseg.training.LocalTrainer`
  (``algorithm="sgd"``, ``aggregation="fedavg"``, ``reset_optimizer=False``), one ``train_round`` per epoch, so the
  batches, augmentation and loss rule (``model.training_loss`` when the model has one) are a site's.
* **Initial model**: ``torch.manual_seed(seed)`` then :func:`fedseg.models.get_model`, as the FL persistor builds
  the initial global model: every baseline model starts from the FL run's initial weights. Batch order and
  augmentation of a local model use the site's stream (``seed + crc32(site) % 100000``, as the FL executor); the
  central model uses ``seed``.
* **Evaluation**: the final model (no checkpoint selection), on each site's held-out part: the ``"test"`` part when
  the dataset gives every site one (:func:`fedseg.sitedata.site_parts`, e.g. covid), else ``"val"`` -- the part the
  FL job's final evaluation uses, so the per-site numbers compare one to one (``fedseg report sites``). A dataset's
  ``evaluate`` hook is used when present (COVID: fused 3-D Dice per case).

Methods:

* ``local``: one model per site, trained on its own ``train`` part; its Dice on its own held-out part is the site's
  row; with ``cross_site`` it is also evaluated on every other site's held-out part (the paper's Fig. 3B heatmap:
  ``cross_site[train_site][eval_site]``).
* ``central``: one model trained on the pooled ``train`` parts of all sites (:class:`fedseg.data.pooled.PooledData`),
  evaluated on every site's held-out part.

Per-image arrays (``per_image_dice``) are dropped from the results.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.errors import ConfigError

METHODS = ("local", "central")
METRICS = (("dice", "Dice"), ("dice_s", "DiceS"), ("dice_l", "DiceL"))
PER_ITEM_KEYS = ("per_image_dice",)

Loader = Callable[[str, str], Any]  # (site, part) -> dataset object


@dataclass
class BaselineSettings:
    """What a baseline trains with (see the module docstring for where each value comes from)."""

    job: str
    dataset: str
    data_args: dict[str, Any]
    model: str
    model_args: dict[str, Any]
    in_channels: int
    num_classes: int
    batch_size: int
    lr: float
    weight_decay: float
    augment: bool
    device: str
    seed: int
    num_threads: int | None
    max_steps_per_round: int | None
    epochs: int
    lr_source: str = "lr"  # "lr" or "beta" (Per-FedAvg job)
    fl_num_rounds: int | None = None
    fl_local_epochs: int | None = None
    optimizer: str = "AdamW (continuous: one optimizer state for all epochs)"
    held_out_part: str = "val"


@dataclass
class TrainedModel:
    name: str  # the site (local) or "central"
    state: dict[str, Any]
    n_train: int
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0


@dataclass
class BaselineResult:
    method: str
    settings: BaselineSettings
    sites: dict[str, dict[str, Any]]  # site -> metrics of its row
    cross_site: dict[str, dict[str, float | None]] | None  # local: train site -> eval site -> metric
    models: dict[str, TrainedModel]
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------- settings
def default_epochs(job) -> int:
    """The FL job's total number of local epochs per site: ``num_rounds x local_epochs``."""
    return int(job.num_rounds) * int(job.local_epochs)


def held_out_part(dataset: str) -> str:
    """"test" when the dataset gives every site a test part (:func:`fedseg.sitedata.site_parts`), else "val"."""
    from fedseg import sitedata

    parts_of = getattr(sitedata, "site_parts", None)
    parts = tuple(parts_of(dataset)) if parts_of is not None else ("train", "val")
    return "test" if "test" in parts else "val"


def default_sites(job) -> list[str]:
    return [f"site-{i}" for i in range(1, int(job.min_clients) + 1)]


def settings_from_job(job, epochs: int | None = None) -> BaselineSettings:
    """Baseline settings of a :class:`fedseg.jobs.recipes.SegJob` (any object with its fields)."""
    if epochs is None:
        epochs = default_epochs(job)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"baseline epochs must be an integer >= 1, got {epochs!r}")
    perfedavg = getattr(job, "algorithm", "sgd") == "perfedavg"
    lr = float(job.beta) if perfedavg else float(job.lr)
    return BaselineSettings(
        job=job.name, dataset=job.dataset, data_args=dict(job.data_args), model=job.model,
        model_args=dict(job.model_args), in_channels=int(job.in_channels), num_classes=int(job.num_classes),
        batch_size=int(job.batch_size), lr=lr, weight_decay=float(job.weight_decay), augment=bool(job.augment),
        device=job.device, seed=int(job.seed), num_threads=job.num_threads,
        max_steps_per_round=job.max_steps_per_round, epochs=epochs,
        lr_source="beta" if perfedavg else "lr", fl_num_rounds=int(job.num_rounds),
        fl_local_epochs=int(job.local_epochs), held_out_part=held_out_part(job.dataset))


def site_loader(settings: BaselineSettings, progress: bool = False) -> Loader:
    """(site, part) -> dataset via :func:`fedseg.sitedata.load_site_data`, each part loaded once."""
    from fedseg.sitedata import load_site_data

    cache: dict[tuple[str, str], Any] = {}

    def load(site: str, part: str):
        if (site, part) not in cache:
            cache[(site, part)] = load_site_data(settings.dataset, site, part, settings.data_args,
                                                 progress=progress)[0]
        return cache[(site, part)]

    return load


def site_seed(seed: int, site: str) -> int:
    """The site's training stream seed, as the FL executor derives it."""
    return int(seed) + zlib.crc32(site.encode()) % 100_000


# ---------------------------------------------------------------------------------------------- training
def build_model(settings: BaselineSettings):
    """The job's model with the FL run's initial weights (``torch.manual_seed(seed)`` as the persistor)."""
    import torch

    from fedseg.models import get_model

    torch.manual_seed(int(settings.seed))
    return get_model(settings.model, in_channels=settings.in_channels, num_classes=settings.num_classes,
                     **settings.model_args)


def make_trainer(settings: BaselineSettings, train_data, seed: int):
    """A :class:`fedseg.training.LocalTrainer` for continuous AdamW training (one epoch per ``train_round``)."""
    from fedseg.sitedata import augmenter
    from fedseg.training import LocalTrainer, TrainConfig

    cfg = TrainConfig(lr=settings.lr, weight_decay=settings.weight_decay, batch_size=settings.batch_size,
                      local_epochs=1, max_steps_per_round=settings.max_steps_per_round, aggregation="fedavg",
                      algorithm="sgd", augment=settings.augment, reset_optimizer=False, device=settings.device,
                      seed=int(seed))
    augment_fn = augmenter(settings.dataset) if settings.augment else None
    return LocalTrainer(build_model(settings), train_data, cfg, augment_fn=augment_fn)


def train_model(settings: BaselineSettings, train_data, name: str, seed: int, progress: bool = True):
    """Train ``settings.epochs`` epochs on ``train_data``; returns (trainer, TrainedModel)."""
    from tqdm.auto import tqdm

    n = len(np.asarray(train_data.delta))
    if n == 0:
        raise ConfigError(f"{name}: no training samples; check that site's data (fedseg data scan)")
    trainer = make_trainer(settings, train_data, seed)
    trained = TrainedModel(name=name, state={}, n_train=n)
    t0 = time.perf_counter()
    bar = tqdm(range(settings.epochs), desc=f"{name} ({n} samples)", unit="epoch", disable=not progress)
    for epoch in bar:
        # the model holds the current weights; train_round loads them (a no-op copy) and continues from there,
        # with the optimizer state kept (reset_optimizer=False)
        res = trainer.train_round(trainer.model.state_dict())
        rec = {"epoch": epoch + 1, "train_loss": float(res.metrics["train_loss"]), "steps": int(res.steps),
               "seconds": float(res.metrics["train_seconds"])}
        trained.history.append(rec)
        bar.set_postfix(loss=f"{rec['train_loss']:.4f}")
    trained.train_seconds = time.perf_counter() - t0
    trained.state = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
    return trainer, trained


def public(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics without per-image arrays."""
    return {k: v for k, v in summary.items() if k not in PER_ITEM_KEYS and not isinstance(v, np.ndarray)}


def evaluate_on(trainer, data, part: str) -> dict[str, Any]:
    out = public(trainer.evaluate(data))
    out["part"] = part
    return out


def _begin(settings: BaselineSettings, sites: Sequence[str], load: Loader | None):
    """Checked sites, the loader, the held-out part and the start time of a baseline run (threads set)."""
    if settings.num_threads:
        import torch

        torch.set_num_threads(int(settings.num_threads))
    return _check_sites(sites), load or site_loader(settings), settings.held_out_part, time.perf_counter()


def run_local(settings: BaselineSettings, sites: Sequence[str], load: Loader | None = None, cross_site: bool = True,
              progress: bool = True) -> BaselineResult:
    """Independent training: one model per site on its own train part (module docstring)."""
    sites, load, part, t0 = _begin(settings, sites, load)
    rows, matrix, models = {}, ({} if cross_site else None), {}
    for site in sites:
        trainer, trained = train_model(settings, load(site, "train"), site, site_seed(settings.seed, site), progress)
        models[site] = trained
        rows[site] = evaluate_on(trainer, load(site, part), part)
        rows[site]["n_train"] = trained.n_train
        if cross_site:
            matrix[site] = {}
            for other in sites:
                m = rows[site] if other == site else evaluate_on(trainer, load(other, part), part)
                matrix[site][other] = m.get("dice")
    return BaselineResult("local", settings, rows, matrix, models, time.perf_counter() - t0)


def run_central(settings: BaselineSettings, sites: Sequence[str], load: Loader | None = None,
                progress: bool = True) -> BaselineResult:
    """Centralized training: one model on the pooled train parts of ``sites`` (module docstring)."""
    from fedseg.data.pooled import PooledData

    sites, load, part, t0 = _begin(settings, sites, load)
    pooled = PooledData([load(s, "train") for s in sites], names=sites)
    trainer, trained = train_model(settings, pooled, "central", settings.seed, progress)
    rows = {}
    for site, n_site in zip(sites, pooled.sizes):
        rows[site] = evaluate_on(trainer, load(site, part), part)
        rows[site]["n_train_site"] = n_site
    return BaselineResult("central", settings, rows, None, {"central": trained}, time.perf_counter() - t0)


def _check_sites(sites: Sequence[str]) -> list[str]:
    sites = list(sites)
    if not sites:
        raise ConfigError("a baseline needs at least one site")
    dup = sorted({s for s in sites if sites.count(s) > 1})
    if dup:
        raise ConfigError(f"sites given twice: {dup}")
    return sites


# ---------------------------------------------------------------------------------------------- output
def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def mean_over_sites(rows: Mapping[str, Mapping[str, Any]], key: str) -> float | None:
    """Unweighted mean over sites (sites without a value for ``key`` do not count); None when none has one."""
    vals = [float(m[key]) for m in rows.values() if m.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def markdown(result: BaselineResult) -> str:
    s = result.settings
    title = {"local": "independent (local-only) training", "central": "centralized (pooled) training"}[result.method]
    head = "| site | Dice | DiceS | DiceL | held-out n (small / large) | training samples of the site |"
    lines = [f"# {s.job}: {title}\n", head, "|---|---|---|---|---|---|"]
    for site, m in result.sites.items():
        n_train = m.get("n_train", m.get("n_train_site", "?"))
        counts = f"{m.get('n', '?')} ({m.get('n_small', '?')} / {m.get('n_large', '?')})"
        if "n_slices" in m:  # volumetric evaluation (covid): n = cases, small / large = axial slices
            counts = f"{m.get('n', '?')} case(s) ({m.get('n_small', '?')} / {m.get('n_large', '?')} slices)"
        lines.append(f"| {site} | " + " | ".join(_fmt(m.get(k)) for k, _ in METRICS) + f" | {counts} | {n_train} |")
    lines.append(f"| mean over {len(result.sites)} sites | "
                 + " | ".join(_fmt(mean_over_sites(result.sites, k)) for k, _ in METRICS) + " | - | - |")
    part = "test part" if s.held_out_part == "test" else "validation split"
    model_line = ("one model per site, trained on that site's training part only" if result.method == "local"
                  else f"one model trained on the pooled training parts of {len(result.sites)} sites")
    lr_note = " (the Per-FedAvg job's beta, its local learning rate)" if s.lr_source == "beta" else ""
    epochs_note = (f"= the FL job's {s.fl_num_rounds} rounds x {s.fl_local_epochs} local epochs"
                   if s.fl_num_rounds and s.epochs == s.fl_num_rounds * s.fl_local_epochs else "set by --epochs")
    lines += ["", f"Rows: the final model evaluated on each site's own {part} ({s.held_out_part}); {model_line}. "
              f"{s.epochs} epochs ({epochs_note}), AdamW lr {s.lr:g}{lr_note}, weight decay {s.weight_decay:g}, "
              f"batch {s.batch_size}, optimizer state kept across epochs"
              + (f", at most {s.max_steps_per_round} steps per epoch" if s.max_steps_per_round else "")
              + f"; model {s.model} {json.dumps(s.model_args)}. The mean row is the unweighted mean over sites."]
    if result.cross_site:
        sites = list(result.cross_site)
        lines += ["", ("## Cross-site Dice (rows: the site a model was trained on; columns: the site it is "
                       "evaluated on; the diagonal is the table above)"), "",
                  "| trained on \\ evaluated on | " + " | ".join(sites) + " |", "|---" * (len(sites) + 1) + "|"]
        for a in sites:
            lines.append(f"| {a} | " + " | ".join(_fmt(result.cross_site[a].get(b)) for b in sites) + " |")
    lines += ["", "Training: " + ", ".join(f"{t.name} {t.n_train} samples, {t.train_seconds:.1f} s"
                                            for t in result.models.values())
              + f"; total wall time {result.seconds:.1f} s."]
    return "\n".join(lines) + "\n"


def plot_cross_site(matrix: Mapping[str, Mapping[str, float | None]], out_png: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = list(matrix)
    vals = np.array([[np.nan if matrix[a].get(b) is None else float(matrix[a][b]) for b in sites] for a in sites])
    fig, ax = plt.subplots(figsize=(1.1 * len(sites) + 2.5, 0.9 * len(sites) + 1.8))
    im = ax.imshow(vals, vmin=0, vmax=1, cmap="viridis")
    for i in range(len(sites)):
        for j in range(len(sites)):
            txt = "n/a" if np.isnan(vals[i, j]) else f"{vals[i, j]:.2f}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                    color="black" if not np.isnan(vals[i, j]) and vals[i, j] > 0.6 else "white")
    ax.set_xticks(range(len(sites)), sites)
    ax.set_yticks(range(len(sites)), sites)
    ax.set_xlabel("evaluated on (held-out part)")
    ax.set_ylabel("trained on")
    ax.set_title(title or "cross-site Dice of local models")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Dice")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def metrics_payload(result: BaselineResult) -> dict[str, Any]:
    s = result.settings
    payload = {
        "method": result.method,
        "job": s.job,
        "config": {**asdict(s), "sites": list(result.sites)},
        "sites": result.sites,
        "mean_over_sites": {k: mean_over_sites(result.sites, k) for k, _ in METRICS},
        "training": {t.name: {"n_train": t.n_train, "train_seconds": t.train_seconds, "history": t.history}
                     for t in result.models.values()},
        "seconds": result.seconds,
    }
    if result.cross_site is not None:
        payload["cross_site"] = result.cross_site
        payload["cross_site_metric"] = "dice"
    return _jsonable(payload)


def write_results(out_dir: Path, result: BaselineResult) -> dict[str, Path]:
    """metrics.json, results.md, model_<name>.pt (state dicts), dice_bars.png and, for local with the cross-site
    evaluation, cross_site_heatmap.png."""
    import torch

    from fedseg.results import plot_dice_bars

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out_dir / "metrics.json", "table": out_dir / "results.md", "bars": out_dir / "dice_bars.png"}
    paths["metrics"].write_text(json.dumps(metrics_payload(result), indent=2))
    paths["table"].write_text(markdown(result))
    for name, trained in result.models.items():
        paths[f"model_{name}"] = out_dir / f"model_{name}.pt"
        torch.save(trained.state, paths[f"model_{name}"])
    label = {"local": "local-only models", "central": "centralized model"}[result.method]
    plot_dice_bars(result.sites, None, paths["bars"], title=f"{result.settings.job}: {label} "
                   f"({result.settings.held_out_part} part of each site)")
    if result.cross_site:
        paths["heatmap"] = out_dir / "cross_site_heatmap.png"
        plot_cross_site(result.cross_site, paths["heatmap"],
                        title=f"{result.settings.job}: Dice of local models across sites")
    return paths
