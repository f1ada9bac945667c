"""examples/lightning_supcon.py: two steps of Lightning DDP on 2 CPU processes (gloo), with
fastcon.GradCache, against plain full-batch training.

With ``gather=True`` plain DDP training equals one process training on the concatenated
batch (rank 0's samples first; tests/test_distributed.py checks that), so the reference
here is that single process: the encoder the example builds, SGD on the whole global batch
of each step. The example's weights on both ranks must match it (a rank that trained on its
own gradients is off by far more than the tolerance), and the logged loss must be the
global batch's loss, not one rank's scaled share.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DistributedSampler

import fastcon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "lightning_supcon.py")
WORLD, STEPS, BATCH, CHUNK, SAMPLES, LR, SEED = 2, 2, 8, 3, 64, 0.1, 3
TIMEOUT_S = 300


def _example_module():
    spec = importlib.util.spec_from_file_location("lightning_supcon", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_example(out_dir):
    """Run the example as a script (Lightning's ddp strategy relaunches it for rank 1); kill its
    whole process group if it runs past TIMEOUT_S."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    command = [sys.executable, EXAMPLE, "--devices", str(WORLD), "--steps", str(STEPS), "--batch-size", str(BATCH),
               "--chunk-size", str(CHUNK), "--samples", str(SAMPLES), "--lr", str(LR), "--seed", str(SEED),
               "--out", str(out_dir)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the example did not finish in {TIMEOUT_S} s:\n{output[-4000:]}")
    assert process.returncode == 0, f"the example exited with {process.returncode}:\n{output[-4000:]}"


def _reference(example):
    """One process, plain steps on each step's global batch: the example's encoder and optimiser."""
    dataset = example.make_dataset(SAMPLES, SEED)
    views, labels = dataset.tensors
    # the sampler Lightning puts on each rank's training data (epoch 0)
    shards = [torch.tensor(list(DistributedSampler(dataset, num_replicas=WORLD, rank=r, shuffle=True, seed=0)))
              for r in range(WORLD)]
    encoder = example.make_encoder(SEED)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=LR, momentum=0.9)
    loss_fn = fastcon.SupConLoss(temperature=0.2)
    losses = []
    for step in range(STEPS):
        index = torch.cat([shard[step * BATCH:(step + 1) * BATCH] for shard in shards])  # rank 0's rows first
        optimizer.zero_grad()
        loss = loss_fn(encoder(views[index]), labels[index])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return encoder.state_dict(), losses


@pytest.mark.slow
def test_two_ddp_processes_train_like_plain_full_batch(tmp_path):
    _run_example(tmp_path)
    want_state, want_losses = _reference(_example_module())
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, want in want_state.items():
            err = float((got[name] - want).norm() / want.norm())
            assert err < 1e-5, f"rank {rank}, {name}: relative error {err:.3g} against plain full-batch training"

    with open(tmp_path / "metrics.csv") as f:
        logged = {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(f) if row.get("train_loss")}
    assert sorted(logged) == list(range(STEPS)), logged
    for step, want in enumerate(want_losses):
        assert logged[step] == pytest.approx(want, rel=1e-5), f"step {step}: logged {logged[step]}, global {want}"
