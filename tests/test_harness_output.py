"""What people read: progress in logs, the native-build notice, ``--help``, ``fastcon info``
and the plots (read back from the matplotlib figures)."""

import argparse
import re
import sys

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("matplotlib")

from fastcon.cli import build_parser
from fastcon.cli import main as fastcon_main

# a one-block ViT on the 8x8 digits: about a second per epoch
TINY = ["--model-args", "patch_size=4,embed_dim=32,depth=1,num_heads=2,mlp_ratio=2", "--img-size", "8",
        "--batch-size", "128", "--eval-every", "1", "--lr", "5e-3"]


# ----------------------------------------------------------------------------- progress

def test_progress_into_a_log_is_one_line_per_epoch(tmp_path, capsys):
    """Output that is not a terminal (pytest's capture, ``> log``) gets no progress bars."""
    assert not sys.stdout.isatty()
    assert fastcon_main(["compare", "--losses", "ce,supcon", "--epochs", "2", "--linear-epochs", "3",
                         "--out", str(tmp_path), *TINY]) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "\r" not in text and "it/s" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    for loss in ("ce", "supcon"):
        epochs = [line for line in lines if line.startswith(loss + ":") and " epoch " in line]
        assert len(epochs) == 2, epochs
    assert sum("stage 2, linear classifier" in line for line in lines) == 1
    # per loss: 2 banner lines, 2 epochs, the result (+ supcon's stage 2); then the table and its note
    assert len(lines) <= 2 * 5 + 1 + 4 + 4, "\n".join(lines)


def test_quiet_prints_no_progress(tmp_path, capsys):
    assert fastcon_main(["finetune", "--epochs", "2", "--out", str(tmp_path), "--quiet", *TINY]) == 0
    assert " epoch " not in capsys.readouterr().out


def test_native_build_notice_starts_its_own_line_under_progress_bars(tmp_path, capsys, monkeypatch):
    """On a terminal the bars redraw in place; the first use of the CPU backend (which may compile
    the native kernel and say so on stderr) happens before any bar is drawn."""
    from fastcon import backends
    from fastcon.harness import progress

    monkeypatch.setattr(progress, "interactive", lambda: True)
    real_auto, announced = backends.auto, []

    def first_use(device):
        if not announced:
            announced.append(True)
            print("fastcon: compiling the native CPU kernel (once)", file=sys.stderr, flush=True)
        return real_auto(device)

    monkeypatch.setattr(backends, "auto", first_use)
    assert fastcon_main(["finetune", "--loss", "supcon", "--epochs", "1", "--linear-epochs", "2",
                         "--out", str(tmp_path), *TINY]) == 0
    err = capsys.readouterr().err
    assert "\r" in err  # the bars were drawn
    notices = [line for line in err.replace("\r", "\n").split("\n") if "compiling the native" in line]
    assert notices == ["fastcon: compiling the native CPU kernel (once)"]
    assert err.index("compiling the native") < err.index("\r")


# ----------------------------------------------------------------------------- --help

def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["finetune", "compare", "curve"])
def test_every_option_has_help(command):
    sub = _subparsers()[command]
    missing = [a.option_strings[0] for a in sub._actions if a.option_strings and not a.help]
    assert missing == []
    text = sub.format_help()
    for option in ("--epochs", "--seed", "--weight-decay"):
        assert option in text
    text = " ".join(text.split())
    assert "AdamW weight decay (default: 0.05)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_out_default_names_each_commands_own_folder():
    commands = _subparsers()
    help_of = {name: next(a.help for a in commands[name]._actions if a.dest == "out")
               for name in ("finetune", "compare", "curve")}
    assert "runs/<timestamp>-compare" in help_of["compare"] and "<loss>" not in help_of["compare"]
    compare_help = " ".join(commands["compare"].format_help().split())
    assert "(default runs/<timestamp>-compare)" in compare_help and "-<loss>)" not in compare_help
    assert "runs/<timestamp>-curve" in help_of["curve"]
    assert "runs/<timestamp>-<loss>" in help_of["finetune"]


# ----------------------------------------------------------------------------- fastcon info

def _info(monkeypatch, gpu: bool) -> dict:
    from fastcon import info

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    if gpu:
        props = argparse.Namespace(name="Fake GPU", major=9, minor=0, total_memory=80 * 2**30)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    return {title: dict(rows) for title, rows in info.collect()}


def test_info_does_not_offer_a_gpu_it_does_not_have(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sections = _info(monkeypatch, gpu=False)
    assert "no GPU" in sections["devices"]["cuda"]
    for name, status in sections["backends"].items():  # e.g. "ready on cpu (also cuda where present)"
        assert not re.search(r"(ready|available) on [a-z/]*cuda", status), (name, status)
    triton = sections["backends"]["triton"]
    if not triton.startswith("unavailable"):
        assert triton.startswith("installed, not usable here (needs cuda, none present)")
    assert sections["backend='auto' picks"]["auto on cuda"].endswith("(what a GPU would run; none here)")


def test_info_on_a_gpu_machine(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sections = _info(monkeypatch, gpu=True)
    assert sections["devices"]["cuda:0"].startswith("Fake GPU, sm_90")
    assert sections["backends"]["blockwise"].startswith("ready on cpu/cuda:")
    triton = sections["backends"]["triton"]
    assert triton.startswith("ready on cuda:") or triton.startswith("unavailable")
    assert "none here" not in sections["backend='auto' picks"]["auto on cuda"]


# ----------------------------------------------------------------------------- plots

ROWS = [  # the README's compare table: schane and clce are one objective, so one point
    {"loss": "ce", "test_top1": 0.993, "alignment": 0.219, "uniformity": -2.606},
    {"loss": "supcon", "test_top1": 0.987, "alignment": 0.106, "uniformity": -1.891},
    {"loss": "schane", "test_top1": 0.991, "alignment": 0.150, "uniformity": -2.369},
    {"loss": "clce", "test_top1": 0.991, "alignment": 0.150, "uniformity": -2.369},
    {"loss": "core", "test_top1": 0.993, "alignment": 0.180, "uniformity": -2.530},
]


def _figure_of(monkeypatch, draw):
    """Run ``draw(path)`` and return the figure it saved, still open."""
    import matplotlib.pyplot as plt

    saved = []
    monkeypatch.setattr(plt, "close", lambda fig=None: saved.append(fig))
    draw()
    return saved[-1]


def test_comparison_plot_labels_do_not_overlap_and_bars_start_at_zero(tmp_path, monkeypatch):
    from fastcon.harness import plots

    near = ROWS + [{"loss": "other", "test_top1": 0.5, "alignment": 0.1505, "uniformity": -2.3685}]
    fig = _figure_of(monkeypatch, lambda: plots.comparison(near, str(tmp_path / "compare.png")))
    ax_acc, ax_au = fig.axes
    assert ax_acc.get_ylim()[0] == 0 and ax_acc.get_ylim()[1] >= 100
    texts = [t for t in ax_au.texts]
    assert sorted(t.get_text() for t in texts) == ["ce", "core", "other", "schane = clce", "supcon"]
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_curves_second_panel_shows_the_final_accuracy_of_a_two_stage_run(tmp_path, monkeypatch):
    from fastcon.harness import plots

    history = [{"epoch": e, "stage": 1, "train_loss": 5 - e} for e in (1, 2, 3)]
    history += [{"epoch": e, "stage": 2, "train_loss": 1 / e} for e in (4, 5)]
    fig = _figure_of(monkeypatch, lambda: plots.curves(history, str(tmp_path / "c.png"), final_top1=0.87))
    accuracy = fig.axes[1]
    points = [tuple(zip(*line.get_data())) for line in accuracy.lines]
    assert points == [((5, 87.0),)]
    assert accuracy.get_legend().get_texts()[0].get_text() == "after stage 2 (linear classifier)"

    one_stage = [{"epoch": e, "stage": 1, "train_loss": 1 / e, "test_top1": e / 4} for e in (1, 2, 3)]
    fig = _figure_of(monkeypatch, lambda: plots.curves(one_stage, str(tmp_path / "d.png"), final_top1=0.75))
    assert [tuple(zip(*line.get_data())) for line in fig.axes[1].lines] == [((1, 25.0), (2, 50.0), (3, 75.0))]


def test_memory_axis_reads_in_mib_and_gib(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastcon.bench import plots

    assert plots.format_mib(640) == "640 MiB" and plots.format_mib(1536) == "1.5 GiB"
    assert plots.format_ms(0.5) == "0.5 ms" and plots.format_ms(1500) == "1.5 s"
    for low, high in ((510, 1100), (500, 12000)):
        fig, ax = plt.subplots()
        plots._draw(ax, {"p": [(256, low, low, low), (4096, high, high, high)]}, {}, "peak memory", "t",
                    plots._memory_axis)
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_yticklabels(minor=False) + ax.get_yticklabels(minor=True)]
        labels = [t for t in labels if t]
        assert labels and all(t.endswith((" MiB", " GiB")) for t in labels), labels
        assert not any("10^" in t or "times" in t for t in labels)
        plt.close(fig)
