"""Server component that makes plain ``nvflare simulator jobs/JOB`` safe from NVFlare 2.9's worker-port race.

Built with the server app, which the simulator starts before any worker process, it puts
:class:`fedseg.simulation.ports.PortAllocator` in place of the simulator's ``get_open_ports`` (ports the kernel never
assigns by itself, reserved per process; docs/upstream/nvflare_simulator_port_race.md). It does nothing outside the
simulator: a provisioned or POC server never loads the simulator's modules.
"""

from __future__ import annotations

import sys

from nvflare.apis.fl_component import FLComponent

from fedseg.simulation import ports

RUNNER_MODULE = ports.SIMULATOR_MODULES[0]


class SimulatorPortGuard(FLComponent):
    def __init__(self):
        super().__init__()
        self.patched: list[str] = []
        if RUNNER_MODULE in sys.modules:  # this process is an NVFlare simulator
            self.patched = ports.install()
            self.logger.info(f"simulator worker ports from fedseg's PortAllocator (patched: {self.patched})")
