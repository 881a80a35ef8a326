"""`fedseg` command line.

Each sub-command lives in its own module under :mod:`fedseg.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to the function that runs it.
Heavy imports (torch, nvflare) happen inside the command functions so that ``fedseg --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fedseg.errors import CommandError, FedsegError  # noqa: F401  (CommandError re-exported)

# module name in fedseg.commands -> registered in this order
COMMAND_MODULES = (
    "difficulty_cmd",
    "data_cmd",
    "jobs_cmd",
    "simulate_cmd",
    "evaluate_cmd",
    "cv_cmd",
    "report_cmd",
    "baseline_cmd",
    "predict_cmd",
    "attack_cmd",
    "privacy_cmd",
    "security_cmd",
    "resfim_cmd",
    "he_cmd",
    "deploy_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    from fedseg import __version__

    parser = argparse.ArgumentParser(
        prog="fedseg",
        description="Federated medical image segmentation on NVIDIA FLARE (FedGS, PPPML-HMI, HE, adaptive DP).",
    )
    parser.add_argument("--version", action="version", version=f"fedseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"fedseg.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"fedseg.commands.{name}":
                continue  # command not shipped in this build
            raise
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except FedsegError as e:
        print(f"fedseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    from fedseg.cli import main as _main  # the package's module, not __main__, so error classes match

    sys.exit(_main())
