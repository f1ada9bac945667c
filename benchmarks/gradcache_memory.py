"""Peak memory and step time of one SupCon training step of a ViT, with and without gradient caching.

    PYTHONPATH=. python3 benchmarks/gradcache_memory.py [--plain 8,16,32 --cached 16,32,64 --chunk 32]

Model: timm ``vit_tiny_patch16_224`` (random init) with a 128-d linear head as projection, at
224 px, on synthetic images; two views per image, so a batch of B images is 2B rows of the
network. One step is forward + SupCon + backward + SGD update, either plain (the whole batch
through the network at once) or through :class:`fastcon.GradCache` with ``--chunk`` images
(2 x chunk rows) per forward pass. Each point runs in a fresh process, which reports its peak
resident set (``VmHWM`` of ``/proc/self/status``) and the time of the step, after a warm-up
step of 2 images.

Peak memory grows linearly with the batch (activations per image without caching; inputs and
outputs only with it), so the largest batch that fits a budget is taken from a least-squares
line through the measured points; a batch larger than the measured ones is an extrapolation,
and the output says so. Writes ``gradcache_memory.csv``, ``.md`` and ``.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

from fastcon.bench.measure import write_rows

GIB = 2**30


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_point(batch: int, chunk: int, threads: int) -> dict:
    """One step in this process; ``chunk`` 0: plain."""
    import timm
    import torch

    import fastcon

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=128)
    loss_fn = fastcon.SupConLoss(temperature=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def forward(images):  # [b, 2, 3, 224, 224] -> [b, 2, 128]
        b = images.shape[0]
        return model(images.flatten(0, 1)).view(b, 2, -1)

    def step(b):
        images = torch.randn(b, 2, 3, 224, 224)
        labels = torch.randint(0, 10, (b,))
        optimizer.zero_grad(set_to_none=True)
        if chunk:
            loss = fastcon.GradCache(model, loss_fn, chunk, forward=forward).step(images, labels)
        else:
            loss = loss_fn(forward(images), labels)
            loss.backward()
        optimizer.step()
        return float(loss.detach())

    step(2)  # warm-up: first-call allocations and kernel selection
    idle = vm_hwm_bytes()
    start = time.perf_counter()
    loss = step(batch)
    seconds = time.perf_counter() - start
    return {"mode": "gradcache" if chunk else "plain", "batch": batch, "chunk": chunk, "rows": 2 * batch,
            "peak_bytes": vm_hwm_bytes(), "peak_after_warmup_bytes": idle, "step_seconds": seconds, "loss": loss}


def fit_line(points):
    """Least squares ``peak = a + b * batch``."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plain", default="4,8,16,24", help="batch sizes (images) of plain steps")
    p.add_argument("--cached", default="32,48,64", help="batch sizes (images) of gradient-cached steps")
    p.add_argument("--chunk", type=int, default=16, help="images per chunk (2 x rows) under gradient caching")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget-gb", type=float, default=16.0, help="memory budget in GiB for the largest batch")
    p.add_argument("--machine-gb", type=float, default=24.0,
                   help="memory of this machine: predicted points above 80%% of it are not run")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--from-csv", default=None, help="rebuild the table and plot from a CSV of this script")
    p.add_argument("--note", default="", help="a line appended to the Markdown (e.g. the machine's load)")
    p.add_argument("--point", nargs=2, type=int, metavar=("BATCH", "CHUNK"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.point:
        print(json.dumps(run_point(*args.point, args.threads)))
        return 0

    rows = load_csv(args.from_csv) if args.from_csv else measure(args)
    if not rows:
        print("no point was measured")
        return 1
    os.makedirs(args.out, exist_ok=True)
    write_rows(os.path.join(args.out, "gradcache_memory.csv"), rows)
    text = report(rows, args)
    with open(os.path.join(args.out, "gradcache_memory.md"), "w") as f:
        f.write(text)
    print(text)
    plot(rows, args, os.path.join(args.out, "gradcache_memory.png"))
    return 0


def measure(args) -> list:
    plan = [(b, 0) for b in map(int, args.plain.split(","))] + [(b, args.chunk) for b in map(int, args.cached.split(","))]
    rows = []
    for batch, chunk in plan:
        mode = "gradcache" if chunk else "plain"
        done = [(r["batch"], r["peak_bytes"]) for r in rows if r["mode"] == mode]
        if len(done) >= 2:
            a, b = fit_line(done)
            if a + b * batch > 0.8 * args.machine_gb * GIB:
                print(f"{mode} B={batch}: predicted {(a + b * batch) / GIB:.1f} GiB, not run on this machine")
                continue
        cmd = [sys.executable, os.path.abspath(__file__), "--point", str(batch), str(chunk), "--threads",
               str(args.threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        load = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{mode} B={batch}: failed (exit {proc.returncode}): {proc.stderr[-500:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["load_avg_1min"] = round(load, 2)
        rows.append(r)
        print(f"{mode:9s} B={batch:4d} ({2 * batch:4d} rows) chunk={chunk:3d}: peak {r['peak_bytes'] / GIB:6.2f} GiB, "
              f"step {r['step_seconds']:6.1f} s", flush=True)
    return rows


def load_csv(path: str) -> list:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k != "mode" and v not in ("", None):
                r[k] = float(v) if "." in v or "e" in v else int(v)
    return rows


# what a gradient-cached step holds per image besides one chunk's activations: the input
# images (2 views, 3 x 224 x 224 float32) and the outputs with their cached gradients
IMAGE_BYTES = 2 * 3 * 224 * 224 * 4
OUTPUT_BYTES = 2 * 128 * 4 * 2


def budget_lines(rows, args) -> dict:
    """``{mode: (intercept, slope, largest batch, how)}`` for the memory budget."""
    budget = args.budget_gb * GIB
    result = {}
    for mode in ("plain", "gradcache"):
        pts = [(r["batch"], r["peak_bytes"]) for r in rows if r["mode"] == mode]
        if len(pts) < 2:
            continue
        a, b = fit_line(pts)
        how = "least-squares line through the measured points"
        if mode == "gradcache" and b < IMAGE_BYTES + OUTPUT_BYTES:
            # the measured growth is below the allocator's noise: bound it by what is held per image
            b = IMAGE_BYTES + OUTPUT_BYTES
            a = max(y - b * x for x, y in pts)
            how = ("the measured peaks are flat within noise, so the line is drawn above every measured point "
                   f"with the bytes held per image ({b / 2**20:.2f} MiB: the two input views and the outputs)")
        largest = int((budget - a) / b)
        measured = max(x for x, _ in pts)
        if largest > measured:
            how += f"; extrapolated beyond the largest measured batch ({measured}), not run"
        result[mode] = (a, b, largest, how)
    return result


def report(rows, args) -> str:
    per_s = {m: [r["step_seconds"] / r["batch"] for r in rows if r["mode"] == m] for m in ("plain", "gradcache")}
    lines = [f"One SupCon training step of `vit_tiny_patch16_224` (random init, 224 px, two views per image, "
             f"128-d head), float32 on the CPU ({args.threads} threads), one fresh process per point; peak = "
             "VmHWM (peak resident set, torch and the model included); step time after a 2-image warm-up step. "
             f"Gradient caching: {args.chunk} images ({2 * args.chunk} rows) per forward pass.", "",
             "| mode | batch (images) | rows | peak GiB | step s | s / image |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['rows']} | {r['peak_bytes'] / GIB:.2f} | "
                     f"{r['step_seconds']:.1f} | {r['step_seconds'] / r['batch']:.2f} |")
    lines.append("")
    for mode, (a, b, largest, how) in budget_lines(rows, args).items():
        lines.append(f"- **{mode}**: peak = {a / GIB:.2f} GiB + {b / 2**20:.2f} MiB per image; largest batch in "
                     f"{args.budget_gb:g} GiB: **{largest} images** ({how}).")
    if per_s["plain"] and per_s["gradcache"]:
        lines.append(f"- Time per image: plain {min(per_s['plain']):.2f}-{max(per_s['plain']):.2f} s, gradient "
                     f"caching {min(per_s['gradcache']):.2f}-{max(per_s['gradcache']):.2f} s. Gradient caching runs "
                     "the forward pass twice, so expect about 4/3 of the plain step's time per image (forward + "
                     "backward is about 3 forwards).")
    if args.note:
        lines.append(f"- {args.note}")
    return "\n".join(lines) + "\n"


def plot(rows, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fits = budget_lines(rows, args)
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for mode, color in (("plain", "tab:red"), ("gradcache", "tab:blue")):
        pts = [(r["batch"], r["peak_bytes"] / GIB) for r in rows if r["mode"] == mode]
        if not pts:
            continue
        label = "plain" if mode == "plain" else f"gradient caching ({args.chunk} images per chunk)"
        ax.plot(*zip(*pts), "o", color=color, label=label + ": measured")
        if mode in fits:
            a, b, largest, _ = fits[mode]
            xs = [2 ** (k / 4) for k in range(4, 4 * 15)]
            xs = [x for x in xs if x <= largest * 1.3]
            ax.plot(xs, [(a + b * x) / GIB for x in xs], "--", color=color, alpha=0.6,
                    label=f"{label}: line, {largest} images in {args.budget_gb:g} GiB")
    ax.axhline(args.budget_gb, color="gray", lw=0.8)
    ax.text(0.99, args.budget_gb, f"{args.budget_gb:g} GiB", va="bottom", ha="right", color="gray",
            transform=ax.get_yaxis_transform())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (images, 2 views each); dashed beyond the points: extrapolated")
    ax.set_ylabel("peak resident memory (GiB)")
    ax.set_title("SupCon step, vit_tiny_patch16_224 @ 224 px, CPU float32", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
