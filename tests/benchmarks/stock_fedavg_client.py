"""Client script for NVFlare's stock FedAvg recipe (Client API), with fedseg's model, data and trainer.

Used only by the benchmark that compares our FedAvg path (executor + FedGS aggregator with eta = 1) with the stock
recipe: same model, data, trainer and steps, so the difference is the FLARE plumbing.
"""

import argparse

import nvflare.client as flare
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedseg.models import get_model
from fedseg.sitedata import load_site_data
from fedseg.training import LocalTrainer, TrainConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--min-tumour-pixels", type=int, default=12)
    ap.add_argument("--base-chan", type=int, default=8)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    flare.init()
    site = flare.get_site_name()
    data_args = {"image_size": args.image_size, "min_tumour_pixels": args.min_tumour_pixels}
    train, _ = load_site_data("lits", site, "train", data_args)
    val, _ = load_site_data("lits", site, "val", data_args)
    model = get_model("utnet", in_channels=1, num_classes=1, base_chan=args.base_chan, attn_drop=0.0, proj_drop=0.0)
    cfg = TrainConfig(lr=args.lr, batch_size=4, local_epochs=1, aggregation="fedavg",
                      max_steps_per_round=args.max_steps or None, device="cpu")
    trainer = LocalTrainer(model, train, cfg)
    while flare.is_running():
        received = flare.receive()
        # the stock persistor does not send integer buffers (num_batches_tracked): keep the local ones
        params = {**trainer.model.state_dict(), **received.params}
        val_metrics = trainer.evaluate(val, params)  # what our executor does before training, too
        result = trainer.train_round(params)
        flare.send(FLModel(params_type=ParamsType.DIFF, params=result.update,
                           metrics={"dice": float(val_metrics["dice"])},
                           meta={"NUM_STEPS_CURRENT_ROUND": result.steps}))


if __name__ == "__main__":
    main()
