"""``fedseg difficulty``: FedGS difficulty (inverse area, small flag, delta) of mask files, and a batch's eta.

Examples::

    fedseg difficulty --json seg_slice_001.npy seg_slice_002.png
    fedseg difficulty --batch a.nii.gz b.nii.gz c.nii.gz d.nii.gz     # also prints eta for the 4 as one batch
    fedseg difficulty --mode polypgen --json data_C1/masks_C1/*_mask.jpg

Modes: ``lits`` (small = whole-mask inverse area >= tau; l = 1000, tau = 1000) and ``polypgen`` (small = the
smallest detected lesion's inverse area >= tau, erosion + LoG blob detector, see
:func:`fedseg.difficulty.polypgen_difficulty`; l = 100, tau = 150). In both, ``inverse_area`` and ``delta`` use
the whole mask.

All masks are read before anything is printed: a bad file stops the command (exit 2) with a message naming it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, TextIO

from fedseg.errors import ConfigError, DataError

# modes the CLI offers (fedseg.difficulty.mask_difficulty implements them)
_MODES = ("lits", "polypgen")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "difficulty",
        help="FedGS difficulty (inverse area, small flag, delta) of mask files",
        description=(
            "Compute the FedGS difficulty of binary lesion masks: a_inv = H*W / lesion pixels, "
            "delta = tanh((log_base a_inv)^2) * small. small: lits mode a_inv >= tau; polypgen mode "
            "H*W / (area of the smallest detected lesion) >= tau (erosion separates touching lesions, a LoG "
            "blob detector finds them). Empty masks have delta 0. "
            "Masks: .npy, .png (nonzero = lesion), .jpg/.jpeg (grey > 127 = lesion), .nii/.nii.gz (2-D)."
        ),
    )
    parser.add_argument("--mode", choices=_MODES, default="lits",
                        help="difficulty mode (default: lits; polypgen: smallest detected lesion decides small)")
    parser.add_argument("--base", type=float, default=None,
                        help="logarithm base l (default: the mode's paper value, 1000 for lits, 100 for polypgen)")
    parser.add_argument("--tau", type=float, default=None,
                        help="small-lesion threshold on the inverse area (default: the mode's paper value, 1000 for "
                             "lits, 150 for polypgen)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line instead of a table")
    parser.add_argument("--batch", action="store_true",
                        help="treat all masks as one training batch and also print eta = 1 + 2/N * sum(delta)")
    parser.add_argument("masks", nargs="+", metavar="MASK", help="mask files")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from fedseg import difficulty as dif

    out = sys.stdout if out is None else out
    default_base, default_tau = dif.mode_defaults(args.mode)
    base = default_base if args.base is None else args.base
    tau = default_tau if args.tau is None else args.tau
    if not math.isfinite(base) or base <= 0 or base == 1:
        raise ConfigError(f"--base must be a finite number > 0 and != 1 (got {args.base})")
    if not math.isfinite(tau) or tau <= 0:
        raise ConfigError(f"--tau must be a finite number > 0 (got {args.tau})")

    # read everything first: fail before printing anything, naming every bad file
    results: list[tuple[str, Any]] = []
    problems: list[str] = []
    for path in args.masks:
        try:
            mask = dif.read_mask(path)
        except DataError as e:
            problems.append(str(e))
            continue
        results.append((path, dif.mask_difficulty(mask, mode=args.mode, base=base, tau=tau)))
    if problems:
        raise DataError(f"{len(problems)} of {len(args.masks)} mask file(s) could not be used, nothing computed:\n  "
                        + "\n  ".join(problems))

    eta = dif.batch_eta([d.delta for _, d in results]) if args.batch else None
    if args.json:
        for path, d in results:
            record = {"path": path, **d.to_json_dict(), "mode": args.mode, "base": base, "tau": tau}
            print(json.dumps(record), file=out)
        if eta is not None:
            print(json.dumps({"eta": eta}), file=out)
    else:
        _print_table(results, args.mode, base, tau, eta, out)
    return 0


def _print_table(results: list[tuple[str, Any]], mode: str, base: float, tau: float, eta: float | None,
                 out: TextIO) -> None:
    header = ("path", "height", "width", "lesion_pixels", "inverse_area", "small", "delta")
    rows = [
        (path, str(d.height), str(d.width), str(d.lesion_pixels),
         "empty" if math.isinf(d.inverse_area) else f"{d.inverse_area:.2f}",
         "yes" if d.small else "no", f"{d.delta:.6f}")
        for path, d in results
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = ("inverse_area >= tau" if mode == "lits"
            else "H*W / area of the smallest detected lesion >= tau")
    print(f"mode {mode}  base {base:g}  tau {tau:g}  (small: {rule}; delta = tanh((log_base a)^2) if small)",
          file=out)
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        print("  ".join(cells).rstrip(), file=out)
    if eta is not None:
        print(f"eta = {eta:.6f}  (batch of {len(results)}: 1 + 2/N * sum(delta))", file=out)
