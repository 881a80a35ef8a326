"""A SIMULATED poisoning attack as a client task-result filter (security experiments only; paper 002).

At the sites named in ``sites`` (every other site passes its result through untouched) the train result's
WEIGHT_DIFF is replaced by what a malicious site would send (:mod:`fedseg.attacks.poisoning`): ``scale`` (model
replacement, ``gamma`` x the update) or ``noise``. Every attacked round logs a WARNING naming the site and the attack,
and the result's meta says ``simulated_attack`` so that the server's logs show what the defence faced. The filter runs
before any DP or HE filter (the attacker controls its own update). Never deploy it outside an experiment.
"""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedseg.attacks.poisoning import UPDATE_ATTACKS, boost_update, noise_update
from fedseg.errors import ConfigError


class SimulatedAttackFilter(DXOFilter):
    def __init__(self, attack: str = "scale", sites: list[str] | None = None, gamma: float = 4.0,
                 noise_scale: float = 1.0, seed: int | None = None):
        super().__init__(supported_data_kinds=[DataKind.WEIGHT_DIFF], data_kinds_to_filter=[DataKind.WEIGHT_DIFF])
        if attack not in UPDATE_ATTACKS:
            raise ConfigError(f"SimulatedAttackFilter: attack must be one of {UPDATE_ATTACKS}, got {attack!r} "
                              "(mask_flip is a data attack: the trainer's simulated_attack setting)")
        if not sites:
            raise ConfigError("SimulatedAttackFilter: name the attacking site(s) in 'sites'")
        if not gamma > 0 or not noise_scale > 0:
            raise ConfigError(f"SimulatedAttackFilter: gamma and noise_scale must be > 0, got {gamma}, {noise_scale}")
        self.attack, self.sites, self.gamma, self.noise_scale = attack, list(sites), float(gamma), float(noise_scale)
        self._rng = np.random.default_rng(seed)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        site = fl_ctx.get_identity_name()
        if site not in self.sites:
            return None  # an honest site
        if self.attack == "scale":
            data = boost_update(dxo.data, self.gamma)
            what = f"model replacement, update x {self.gamma:g}"
        else:
            data = noise_update(dxo.data, self._rng, self.noise_scale)
            what = f"Gaussian noise with {self.noise_scale:g} x the update's norm"
        self.log_warning(fl_ctx, f"SIMULATED ATTACK at {site}: {what}")
        out = DXO(data_kind=dxo.data_kind, data=data, meta=dict(dxo.meta))
        out.set_meta_prop("simulated_attack", {"site": site, "attack": self.attack})
        return out
