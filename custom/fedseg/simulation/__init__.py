"""Running ``nvflare simulator`` so that it cannot hang: ports that cannot collide (:mod:`.ports`) and a watchdog
that recognises a lost worker or a stalled run, stops exactly its own process tree and retries (:mod:`.runner`)."""

from fedseg.simulation.runner import SimulationError, SimulationResult, simulate

__all__ = ["SimulationError", "SimulationResult", "simulate"]
