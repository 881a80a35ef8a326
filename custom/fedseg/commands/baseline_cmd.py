"""`fedseg baseline {local,central} --job JOB`: the non-federated baselines of the PPPML-HMI comparison.

``local``: independent training, one model per site on its own training part, evaluated on its own held-out part and
(unless ``--no-cross-site``) on every other site's (the paper's Fig. 3B heatmap). ``central``: one model on the pooled
training parts of all sites, evaluated on every site's held-out part. Data, model and training settings come from
the job recipe (``fedseg jobs list``; ``--set KEY=JSON`` overrides a field as in ``fedseg jobs export``), so a
baseline runs on exactly the FL job's data and model. Epochs default to ``num_rounds x local_epochs`` (the same total
number of epochs as the FL run); AdamW at the job's lr (a Per-FedAvg job's beta), optimizer state kept across epochs.
See :mod:`fedseg.baselines` for the details.

Writes into ``--out`` (default ``./baseline_<method>_<job>``): metrics.json, results.md, model_<site|central>.pt,
dice_bars.png and (local) cross_site_heatmap.png. Compare with FL runs: ``fedseg report sites``.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedseg.errors import CommandError

METHODS = ("local", "central")


def register(subparsers):
    p = subparsers.add_parser("baseline", help="non-federated baselines on a job's data: local-only or centralized "
                              "training (the PPPML-HMI comparison)")
    p.add_argument("method", choices=METHODS, help="local: one model per site on its own data; central: one model on "
                   "the pooled data of all sites")
    p.add_argument("--job", required=True, help="the FL job whose data, model and settings to use (fedseg jobs list)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override a job setting (repeatable), e.g. --set data_args.image_size=64")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: the job's num_rounds x local_epochs, the FL run's total)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default ./baseline_<method>_<job>)")
    p.add_argument("--sites", nargs="+", default=None, metavar="SITE",
                   help="sites (default: site-1 .. site-<min_clients> of the job)")
    p.add_argument("--no-cross-site", action="store_true",
                   help="local: skip evaluating every site's model on the other sites' held-out parts")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from fedseg import baselines
    from fedseg.commands.jobs_cmd import parse_sets
    from fedseg.errors import ConfigError
    from fedseg.jobs.recipes import JOBS, override

    if args.job not in JOBS:
        raise CommandError(f"unknown job {args.job!r}; known: {sorted(JOBS)}")
    try:
        job = override(JOBS[args.job], parse_sets(args.set))
    except (ValueError, TypeError) as e:
        raise CommandError(f"--set: {e}") from e
    if args.epochs is not None and args.epochs < 1:
        raise CommandError(f"--epochs must be >= 1, got {args.epochs}")
    if args.no_cross_site and args.method != "local":
        raise CommandError("--no-cross-site only applies to the local baseline")
    try:
        settings = baselines.settings_from_job(job, args.epochs)
    except ConfigError as e:
        raise CommandError(str(e)) from e
    sites = args.sites or baselines.default_sites(job)
    out = args.out or Path(f"baseline_{args.method}_{args.job}")
    progress = not args.no_progress
    print(f"{args.method} baseline of {args.job}: {settings.dataset} {sites}, model {settings.model}, "
          f"{settings.epochs} epochs, AdamW lr {settings.lr:g} ({settings.lr_source}), batch {settings.batch_size}; "
          f"evaluated on each site's {settings.held_out_part} part", flush=True)
    t0 = time.perf_counter()
    load = baselines.site_loader(settings, progress=progress)
    if args.method == "local":
        result = baselines.run_local(settings, sites, load, cross_site=not args.no_cross_site, progress=progress)
    else:
        result = baselines.run_central(settings, sites, load, progress=progress)
    paths = baselines.write_results(out, result)
    print(baselines.markdown(result))
    print(f"wrote {', '.join(sorted(p.name for p in paths.values()))} to {out} "
          f"({time.perf_counter() - t0:.1f} s in all)")
    return 0
