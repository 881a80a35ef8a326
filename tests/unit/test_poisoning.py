"""Simulated poisoning attacks (fedseg.attacks.poisoning) and their FLARE filter with real DXO / FLContext objects."""

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext

from fedseg.attacks.poisoning import boost_update, flip_mask, noise_update
from fedseg.errors import ConfigError
from fedseg.flare.attack_filter import SimulatedAttackFilter

UPDATE = {"w": np.array([[1.0, -2.0], [0.5, 0.0]], np.float32), "b": np.array([3.0], np.float32),
          "bn.num_batches_tracked": np.array(4, np.int64)}


def test_model_replacement_scales_every_float_entry_by_gamma():
    out = boost_update(UPDATE, 4.0)
    np.testing.assert_array_equal(out["w"], [[4.0, -8.0], [2.0, 0.0]])
    np.testing.assert_array_equal(out["b"], [12.0])
    assert out["w"].dtype == np.float32 and out["bn.num_batches_tracked"] == 4
    # with 4 equally weighted sites, the attacker's share of the mean is its whole update: mean = Delta_attacker
    honest = [{"w": np.zeros((2, 2), np.float32)}] * 3
    mean = (sum(h["w"] for h in honest) + out["w"]) / 4
    np.testing.assert_allclose(mean, UPDATE["w"])
    with pytest.raises(ConfigError, match="gamma must be > 0"):
        boost_update(UPDATE, 0.0)


def test_noise_attack_has_the_honest_norm_and_no_signal():
    big = {"w": np.random.default_rng(0).normal(0, 1, (200, 50)).astype(np.float32)}
    out = noise_update(big, np.random.default_rng(1), scale=2.0)
    norm = lambda u: float(np.linalg.norm(u["w"]))  # noqa: E731
    assert norm(out) == pytest.approx(2.0 * norm(big), rel=0.03)
    assert abs(np.corrcoef(out["w"].ravel(), big["w"].ravel())[0, 1]) < 0.05
    assert noise_update(UPDATE, np.random.default_rng(0))["bn.num_batches_tracked"] == 4


def test_flip_mask_swaps_lesion_and_background_of_binary_masks_only():
    np.testing.assert_array_equal(flip_mask(np.array([[0, 1], [1, 0]], np.uint8)), [[1, 0], [0, 1]])
    with pytest.raises(ConfigError, match="binary"):
        flip_mask(np.array([0, 2]))


def _ctx(site):
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=True, sticky=False)
    return ctx


def test_the_filter_attacks_only_the_named_sites_and_says_so(caplog):
    f = SimulatedAttackFilter(attack="scale", sites=["site-4"], gamma=4.0)
    result = DXO(DataKind.WEIGHT_DIFF, dict(UPDATE), meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 7}).to_shareable()
    honest = from_shareable(f.process(result, _ctx("site-1")))
    np.testing.assert_array_equal(honest.data["w"], UPDATE["w"])
    assert honest.get_meta_prop("simulated_attack") is None
    result = DXO(DataKind.WEIGHT_DIFF, dict(UPDATE), meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 7}).to_shareable()
    with caplog.at_level("WARNING"):
        bad = from_shareable(f.process(result, _ctx("site-4")))
    np.testing.assert_array_equal(bad.data["w"], 4 * UPDATE["w"])
    assert bad.get_meta_prop("simulated_attack") == {"site": "site-4", "attack": "scale"}
    assert bad.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 7
    assert "SIMULATED ATTACK at site-4" in caplog.text


@pytest.mark.parametrize("kwargs, match", [({"attack": "flip"}, "attack must be one of"), ({"sites": []}, "name the"),
                                           ({"gamma": -1}, "must be > 0")])
def test_bad_attack_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SimulatedAttackFilter(**{"attack": "scale", "sites": ["site-4"], **kwargs})


class _Rows:
    def __init__(self):
        self.images = np.zeros((3, 4, 4), np.float32)
        self.masks = np.zeros((3, 4, 4), np.uint8)
        self.masks[1, 1:3, 1:3] = 1
        self.delta = np.array([0.0, 0.7, 0.0], np.float32)
        self.small = np.array([False, True, False])
        self.nonempty = np.array([False, True, False])


def test_mask_flipped_data_flips_every_read_mask_and_keeps_the_images():
    from fedseg.attacks.poisoning import MaskFlippedData
    from fedseg.evaluation import image_batch, mask_batch

    data = _Rows()
    flipped = MaskFlippedData(data)
    y = mask_batch(flipped, np.array([0, 1])).numpy()[:, 0]
    np.testing.assert_array_equal(y[0], np.ones((4, 4)))
    np.testing.assert_array_equal(y[1], 1 - data.masks[1])
    np.testing.assert_array_equal(image_batch(flipped, np.array([2])).numpy(), image_batch(data, np.array([2])).numpy())
    assert flipped.masks.shape == data.masks.shape and len(flipped) == 3
    # the difficulty of a flipped mask: never a small lesion, delta 0 (eta = 1)
    np.testing.assert_array_equal(flipped.delta, [0, 0, 0])
    assert not flipped.small.any()
    assert flipped.nonempty is data.nonempty  # other attributes are the wrapped data's
    assert not hasattr(flipped, "batch")  # no hook on the data -> none on the wrapper
    np.testing.assert_array_equal(data.masks[0], 0)  # the site's data is not modified


def test_mask_flipped_data_flips_the_targets_of_a_batch_hook():
    import torch

    from fedseg.attacks.poisoning import MaskFlippedData

    class Hooked(_Rows):
        def batch(self, idx):
            return torch.zeros(len(idx), 1, 4, 4), torch.from_numpy(self.masks[idx, None].astype(np.float32))

    x, y = MaskFlippedData(Hooked()).batch(np.array([1]))
    np.testing.assert_array_equal(y.numpy()[0, 0], 1 - Hooked().masks[1])


def test_mask_flip_is_a_data_attack_not_a_filter_and_the_trainer_validates_it():
    from fedseg.flare.executor import SegmentationTrainer

    with pytest.raises(ConfigError, match="data attack"):
        SimulatedAttackFilter(attack="mask_flip", sites=["site-2"])
    t = SegmentationTrainer(simulated_attack={"attack": "mask_flip", "sites": ["site-2"]})
    assert t.simulated_attack == {"attack": "mask_flip", "sites": ["site-2"]}
    with pytest.raises(ConfigError, match="simulated_attack must be"):
        SegmentationTrainer(simulated_attack={"attack": "scale", "sites": ["site-2"]})
    with pytest.raises(ConfigError, match="simulated_attack must be"):
        SegmentationTrainer(simulated_attack={"attack": "mask_flip", "sites": []})


def test_recipe_puts_mask_flip_in_the_trainer_and_update_attacks_in_the_filter():
    from dataclasses import replace

    from fedseg.jobs.recipes import JOBS

    job = replace(JOBS["fedgs_lits_robust"], attack="mask_flip", attack_sites=["site-3"])
    client = job.client_config()
    assert client["executors"][0]["executor"]["args"]["simulated_attack"] == {"attack": "mask_flip",
                                                                              "sites": ["site-3"]}
    assert client["task_result_filters"] == []
    scale = JOBS["fedgs_lits_robust"].client_config()
    assert "simulated_attack" not in scale["executors"][0]["executor"]["args"]
    assert scale["task_result_filters"][0]["filters"][0]["args"]["attack"] == "scale"
    with pytest.raises(ValueError, match="attack must be one of"):
        replace(job, attack="flip")
