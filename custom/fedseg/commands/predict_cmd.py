"""``fedseg predict``: 3-D segmentation of one CT volume with a saved 2.5D U-Net, written as NIfTI.

Example::

    fedseg predict --dataset covid --model-file results/global_model.pt --image A000069.nii.gz --out pred.nii.gz
    fedseg predict --dataset covid --model-file M.pt --image CASE.nii.gz --out PRED.nii.gz \\
        --model-args '{"base_chan": 64}' --data-args '{"volume_size": 512, "offsets": "paper"}' --label GT.nii.gz

The volume is preprocessed exactly like the training data (resampling to the ``volume_size`` cube, intensity
window; :mod:`fedseg.data.covid`), each view's net runs over every slice of its axis, the three views are fused by
majority vote (:func:`fedseg.volume_inference.predict_volume`) and the prediction is resampled back to the input's
shape and written with its affine. ``base_chan`` is read from the state dict when ``--model-args`` does not give it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"base_chan\": 8}}', got {text!r}")
    return value


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict", help="segment one CT volume with a saved 2.5D U-Net and write the NIfTI prediction",
        description="3-D inference of PPPML-HMI's 2.5D U-Net (three views, majority-vote fusion) on one volume.")
    p.add_argument("--dataset", default="covid", choices=("covid",), help="data set the model was trained on")
    p.add_argument("--model-file", required=True, type=Path,
                   help="state dict saved with torch.save (e.g. results/global_model.pt of a run)")
    p.add_argument("--image", required=True, type=Path, help="CT volume (.nii or .nii.gz, HU)")
    p.add_argument("--out", required=True, type=Path, help="output NIfTI (.nii.gz) with the infection mask")
    p.add_argument("--model", default="unet25d", help="registered model name (default unet25d)")
    p.add_argument("--model-args", type=_json_object, default=None,
                   help="JSON object of model arguments, e.g. '{\"base_chan\": 64}' (default: from the state dict)")
    p.add_argument("--data-args", type=_json_object, default=None,
                   help="JSON object of covid data_args used in training, e.g. '{\"volume_size\": 64}'")
    p.add_argument("--label", type=Path, default=None, help="optional ground-truth mask: print the volumetric Dice")
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward pass (default 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _load_state(path: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    from fedseg.errors import CommandError

    if not path.is_file():
        raise CommandError(f"model file {path} does not exist (it is results/global_model.pt of a run, or any "
                           f"torch.save of the model's state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CommandError(f"cannot read the model file {path} ({type(e).__name__}: {e}); pass a state dict saved "
                           f"with torch.save") from e
    if not isinstance(state, dict) or not state:
        raise CommandError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return {k: (torch.from_numpy(np.asarray(v)) if not isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    import nibabel as nib
    import numpy as np
    from tqdm.auto import tqdm

    from fedseg.data.covid import CovidPreprocessing, preprocess_volume, read_covid_case, read_covid_image
    from fedseg.errors import CommandError, ConfigError
    from fedseg.models import get_model
    from fedseg.sitedata import in_channels
    from fedseg.training import load_state, resolve_device
    from fedseg.volume_inference import predict_volume, write_prediction_nifti

    out = sys.stdout if out is None else out
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.image.is_file():
        raise CommandError(f"image {args.image} does not exist")
    state = _load_state(args.model_file)
    model_args = dict(args.model_args or {})
    if args.model == "unet25d" and "base_chan" not in model_args:
        first = state.get("views.0.enc.0.0.weight")
        if first is None or first.ndim != 4:
            raise CommandError(f"{args.model_file} is not a unet25d state dict (no views.0.enc.0.0.weight); check "
                               f"--model or pass --model-args")
        model_args["base_chan"] = int(first.shape[0])
    try:
        prep = CovidPreprocessing(**(args.data_args or {}))
    except TypeError as e:
        raise ConfigError(f"bad --data-args {args.data_args}: {e}") from e
    model = get_model(args.model, in_channels=in_channels(args.dataset), num_classes=1, **model_args)
    load_state(model, state)
    device = resolve_device(args.device)
    model.to(device)

    if args.label is not None:
        hu, truth, _ = read_covid_case(args.image, args.label)
    else:
        hu, truth = read_covid_image(args.image), None
    cube, _ = preprocess_volume(hu, prep)
    s = prep.volume_size
    with tqdm(total=3 * s, desc="predict (3 views x slices)", unit="slice", disable=args.no_progress) as bar:
        fused, _ = predict_volume(model, cube, prep.offsets, device, args.batch_size, progress=bar.update)
    path = write_prediction_nifti(fused, args.image, args.out)
    pred = np.asarray(nib.load(str(path)).dataobj) > 0
    print(f"wrote {path} ({int(pred.sum())} infection voxels, shape {tuple(hu.shape)}; cube {s}^3, views fused by "
          f"majority vote)", file=out)
    if truth is not None:
        t = truth > 0
        total = int(pred.sum()) + int(t.sum())
        dice = 1.0 if total == 0 else 2.0 * int((pred & t).sum()) / total
        print(f"volumetric Dice against {args.label}: {dice:.4f}", file=out)
    return 0
