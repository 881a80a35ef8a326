"""`fedseg evaluate`: Dice / DiceS / DiceL of a saved global model on a site's data, with overlays.

Used where the test centre lives (a production server holds no patient data) and to inspect any site's split.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path


def register(subparsers):
    p = subparsers.add_parser("evaluate", help="evaluate a saved global model (global_model.pt) on a site's data")
    p.add_argument("--model", required=True, type=Path, help="global_model.pt from a results folder")
    p.add_argument("--job", required=True, help="the job that trained it (model and preprocessing come from its recipe)")
    p.add_argument("--part", default="test", choices=["test", "val", "train"],
                   help="test: the split's test centre; val/train: this site's part")
    p.add_argument("--site", default=None, help="site name for the data configuration (default: server for test, site-1 otherwise)")
    p.add_argument("--data-config", type=Path, default=None, help="data configuration JSON (sets FEDSEG_DATA_CONFIG)")
    p.add_argument("--workspace", type=Path, default=None, help="site workspace whose local/fedseg_data.json to use")
    p.add_argument("--out", type=Path, default=None, help="folder for metrics JSON and overlays (default: next to the model)")
    p.add_argument("--overlays", type=int, default=8, help="number of overlay images (small lesions first); 0 for none")
    p.add_argument("--model-args", type=json.loads, default=None,
                   help="JSON object overriding the recipe's model_args, e.g. '{\"base_chan\": 4}'")
    p.add_argument("--data-args", type=json.loads, default=None,
                   help="JSON object overriding the recipe's data_args, e.g. '{\"image_size\": 256}'")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


@contextmanager
def _env(name: str, value):
    """Set an environment variable for the duration of the command (the CLI may run in-process, e.g. in tests)."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run(args) -> int:
    from fedseg.errors import CommandError

    if args.data_config is not None and not args.data_config.is_file():
        raise CommandError(f"data configuration {args.data_config} does not exist")
    with _env("FEDSEG_DATA_CONFIG", str(args.data_config.resolve()) if args.data_config else None):
        return _run(args)


def _run(args) -> int:
    import torch

    from fedseg.errors import CommandError
    from fedseg.evaluation import evaluate_model, write_prediction_overlays
    from fedseg.jobs.recipes import JOBS
    from fedseg.models import get_model
    from fedseg.results import markdown_table
    from fedseg.sitedata import load_site_data, load_test_data
    from fedseg.training import load_state, resolve_device

    if args.job not in JOBS:
        raise CommandError(f"unknown job {args.job!r}; known: {sorted(JOBS)}")
    if not args.model.is_file():
        raise CommandError(f"model file {args.model} does not exist (it is results/global_model.pt of a run)")
    job = JOBS[args.job]
    model_args = {**job.model_args, **(args.model_args or {})}
    data_args = {**job.data_args, **(args.data_args or {})}
    if args.part == "test":
        site = args.site or "server"
        data, source = load_test_data(job.dataset, data_args, site, args.workspace, progress=True)
    else:
        site = args.site or "site-1"
        data, source = load_site_data(job.dataset, site, args.part, data_args, args.workspace, progress=True)
    try:
        state = torch.load(args.model, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CommandError(f"cannot read {args.model}: {e}") from e
    model = get_model(job.model, in_channels=job.in_channels, num_classes=job.num_classes, **model_args)
    load_state(model, state)
    device = resolve_device(args.device)
    model.to(device)
    summary = evaluate_model(model, data, device)
    dice = summary.pop("per_image_dice")
    label = f"{site} {args.part}"
    print(markdown_table({label: summary}, None), end="")
    out = args.out or args.model.parent / f"evaluation_{args.part}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"job": args.job, "part": args.part, "site": site,
                                                  "data": str(source.root or "built-in"), **summary}, indent=2))
    if args.overlays > 0:
        write_prediction_overlays(model, data, device, dice, out / "overlays.png", args.overlays)
    print(f"evaluation written to {out}")
    return 0

