"""Supervised contrastive training with PyTorch Lightning, DDP and gradient caching.

A tiny encoder learns SupCon on synthetic two-view data. Each process runs the encoder on
``--chunk-size`` samples at a time (fastcon.GradCache), its loss contrasts against every
rank's rows (``gather=True``), and the parameters get exactly the gradients of plain DDP
training on the whole batch.

    pip install lightning            # beside fastcon
    python examples/lightning_supcon.py --devices 2 --steps 50
    python examples/lightning_supcon.py --devices 1 --steps 50    # the same script, one process

Three things make it correct under Lightning's ``strategy="ddp"``:

* Lightning wraps the whole LightningModule in DistributedDataParallel, and the training
  step calls ``self.encoder`` directly, outside DDP's forward: DDP's all-reduce never runs.
  ``GradCache(..., sync_gradients=True)`` all-reduces the encoder's gradients itself,
  averaged as DDP does (without it, GradCache refuses to run on several processes).
* Manual optimisation: GradCache runs its own backward passes, so there is no
  ``manual_backward`` and no automatic optimisation closure.
* The loss each rank returns is its share of the batch's loss times the world size (so
  that DDP's averaging gives the whole batch's gradients); the logged value is
  ``fastcon.distributed.global_loss_value(loss)``, the loss of the whole batch, the same
  on every rank.

``--out DIR`` writes each rank's final encoder weights (``rank{r}.pt``) and Lightning's
CSV log (``metrics.csv``) there.
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastcon

D_IN, HIDDEN, D_OUT, CLASSES = 16, 32, 8, 4


class Encoder(torch.nn.Module):
    """``[b, V, D_IN]`` views -> ``[b, V, D_OUT]`` features (each row on its own: no batch norm,
    so chunks of any size give the gradients of the whole batch)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.ReLU(), torch.nn.LayerNorm(HIDDEN),
                                       torch.nn.Linear(HIDDEN, D_OUT))

    def forward(self, views):
        return self.net(views)


def make_encoder(seed: int) -> Encoder:
    torch.manual_seed(seed)
    return Encoder()


def make_dataset(samples: int, seed: int) -> TensorDataset:
    """Two noisy views of points around one centre per class: ``([samples, 2, D_IN], [samples])``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, D_IN, generator=g) * 2
    labels = torch.randint(0, CLASSES, (samples,), generator=g)
    views = centres[labels][:, None, :] + torch.randn(samples, 2, D_IN, generator=g)
    return TensorDataset(views, labels)


class SupConModule(L.LightningModule):
    def __init__(self, *, seed: int = 0, chunk_size: int = 4, lr: float = 0.1, temperature: float = 0.2):
        super().__init__()
        self.encoder = make_encoder(seed)
        self.lr = lr
        self.automatic_optimization = False
        loss_fn = fastcon.SupConLoss(temperature=temperature, gather=True)
        # The encoder is called directly, never through the DDP wrapper Lightning puts around
        # this module: GradCache averages its gradients over the ranks itself.
        self.cache = fastcon.GradCache(self.encoder, loss_fn, chunk_size, sync_gradients=True)

    def training_step(self, batch, batch_idx):
        views, labels = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = self.cache.step(views, labels)  # forward and backward, chunk by chunk
        optimizer.step()
        # already the whole batch's loss on every rank: no sync_dist needed
        self.log("train_loss", fastcon.distributed.global_loss_value(loss), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.encoder.parameters(), lr=self.lr, momentum=0.9)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=2, help="CPU processes (DDP over gloo)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8, help="samples per process and step")
    parser.add_argument("--chunk-size", type=int, default=3, help="samples per forward pass")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for the final weights and the CSV log")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # tiny matrices: threads only contend between the processes
    model = SupConModule(seed=args.seed, chunk_size=args.chunk_size, lr=args.lr)
    # under DDP Lightning replaces the sampler by a DistributedSampler that shuffles and shards
    loader = DataLoader(make_dataset(args.samples, args.seed), batch_size=args.batch_size, shuffle=True)
    logger = L.pytorch.loggers.CSVLogger(args.out, name="", version="") if args.out else False
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                        max_steps=args.steps, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=args.out is None)
    trainer.fit(model, loader)
    if args.out:
        torch.save(model.encoder.state_dict(), os.path.join(args.out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
