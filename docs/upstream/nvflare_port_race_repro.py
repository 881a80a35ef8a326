"""Reproduce NVFlare 2.9's simulator hang on a lost worker port, deterministically.

    python docs/upstream/nvflare_port_race_repro.py JOB_FOLDER -w WS -n 2 -t 2 [--steal-once MARKER]

Runs NVFlare's simulator (the arguments of ``nvflare simulator``) after wrapping the port choice of the simulator's
client runner (``get_open_ports``, or fedseg's PortAllocator when the job installs it) so that the first worker port it
hands out is bound by another socket right away, as any socket that asks the kernel for a port may do by chance in
the window between ``get_open_ports`` closing its socket and the worker binding the number. The worker dies with
``OSError: [Errno 98] Address already in use`` (its ``error_log.txt``), the runner logs ``Failed to create connection
to the child process`` 60 s later, and the run then waits forever for that site. ``--steal-once MARKER`` steals only
while MARKER does not exist (and creates it): a retry runs clean. Used by tests/integration/test_simulator_runner.py.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path


def main(argv=None) -> int:
    from nvflare.private.fed.app.simulator import simulator_runner
    from nvflare.private.fed.app.simulator.simulator import define_simulator_parser, run_simulator

    from fedseg.simulation.ports import PortAllocator

    parser = argparse.ArgumentParser()
    define_simulator_parser(parser)
    parser.add_argument("--steal-once", type=Path, default=None)
    args = parser.parse_args(argv)
    held: list[socket.socket] = []

    def steal_first(choose):
        def wrapped(*a, **kw):
            ports = choose(*a, **kw)
            worker_port = sys._getframe(1).f_code.co_name == "do_one_task"  # not the server's own port
            if worker_port and not held and not (args.steal_once and args.steal_once.exists()):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind(("", ports[0]))  # bound, not listening: the worker cannot bind it, the runner cannot connect
                held.append(s)
                print(f"repro: port {ports[0]} of the next worker taken by another socket", flush=True)
                if args.steal_once:
                    args.steal_once.touch()
            return ports
        return wrapped

    simulator_runner.get_open_ports = steal_first(simulator_runner.get_open_ports)  # NVFlare's own choice
    PortAllocator.allocate = steal_first(PortAllocator.allocate)  # fedseg's, where the job's SimulatorPortGuard puts it
    return int(run_simulator(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
