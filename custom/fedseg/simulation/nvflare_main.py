"""``python -m fedseg.simulation.nvflare_main JOB_FOLDER -w WS -n N -t T ...``: NVFlare's own simulator (the same
arguments as ``nvflare simulator``), with :mod:`fedseg.simulation.ports` in place of its port choice. The process
that :func:`fedseg.simulation.runner.simulate` starts and watches."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from nvflare.private.fed.app.simulator.simulator import define_simulator_parser, run_simulator

    from fedseg.simulation import ports

    parser = argparse.ArgumentParser(prog="fedseg.simulation.nvflare_main")
    define_simulator_parser(parser)
    args = parser.parse_args(argv)
    patched = ports.install()
    print(f"fedseg: nvflare simulator with worker ports from fedseg's PortAllocator ({', '.join(patched)})",
          flush=True)
    return int(run_simulator(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
