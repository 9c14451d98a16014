"""The whole pipeline on CPU in a few minutes, nothing to download: python demo.py

A tiny random LLaMA-architecture checkpoint -> the bundled Vietnamese sample prepared -> 2-process
torchrun training with TFT and with DFT-logits -> evaluate.py on the bundled benchmark samples ->
the two side by side, with their training losses (and loss curves as a PNG with matplotlib). All
under runs/demo/; a rerun skips each stage whose output exists and resumes training.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

try:                                  # optional: only the loss-curve PNG needs it
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

HERE = Path(__file__).resolve().parent
OUT = Path("runs/demo")
NOTE = ("A tiny random model trained for a few steps shows that the pipeline works end to end; "
        "its scores say nothing about the method's effect (that takes LLaMA-2-7B / Gemma-2-2B).")
MODES = ("tft", "dft-logits")
# The metric the paper reports for each benchmark (results.json holds more).
MAIN_METRICS = {"f1", "acc", "mc1"}


def stage(title: str, done: bool, command: list) -> None:
    """A pipeline step as its own process, unless its output exists; a failure ends the demo."""
    print(f"\n=== {title}" + (" (done before: reused)" if done else ""), flush=True)
    if done:
        return
    print("$ " + " ".join(map(str, command)), flush=True)
    started = time.perf_counter()
    # One thread per process: the two training processes share the CPU cores.
    finished = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if finished.returncode:
        sys.exit(f"demo.py: '{title}' failed (exit status {finished.returncode}); see above")
    print(f"({time.perf_counter() - started:.0f} s)", flush=True)


def run_demo(out: Path) -> dict:
    """The stages, in order; -> {mode: its run dir}."""
    python = sys.executable
    model = out / "tiny-llama"
    data = out / "prepared-vi"
    stage("tiny checkpoint", (model / "config.json").is_file(),
          [python, HERE / "model.py", "--make-tiny", model, "--family", "llama"])
    stage("prepare the bundled Vietnamese sample", (data / "meta.json").is_file(),
          [python, HERE / "prepare_data.py", "--lang", "vi", "--tokenizer", model, "--out", data])
    runs = {}
    for mode in MODES:
        run = runs[mode] = out / mode
        # ~110 training examples, 16 a step: ~7 steps an epoch; an lr a tiny model learns at.
        stage(f"train --mode {mode} (torchrun, 2 CPU processes)",
              (run / "final" / "config.json").is_file(),
              [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               HERE / "train.py", "--lang", "vi", "--model", model, "--data", data, "--out", run,
               "--mode", mode, "--epochs", "2", "--global-batch", "16", "--batch-size", "4",
               "--lr", "2e-3", "--warmup-ratio", "0.1", "--val-size", "8", "--eval-every", "5",
               "--save-every", "10"])
        stage(f"evaluate the {mode} model on data/bench_sample",
              (run / "final" / "eval" / "results.json").is_file(),
              [python, HERE / "evaluate.py", "--model", run / "final", "--langs", "vi,ar,zh",
               "--tasks", "all", "--data-dir", HERE / "data" / "bench_sample",
               "--max-new-tokens", "16"])
    return runs


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def print_table(runs: dict) -> None:
    """Benchmarks and last training losses of each run, side by side (a Markdown table)."""
    results = {mode: {(r["task"], r["lang"], r["metric"]): r["value"]
                      for r in json.loads((run / "final" / "eval" / "results.json").read_text())}
               for mode, run in runs.items()}
    last = {mode: read_metrics(run)[-1] for mode, run in runs.items()}
    print("\n| task | lang | metric | " + " | ".join(runs) + " |")
    print("|---|---|---|" + "---|" * len(runs))
    for key in sorted(k for k in set().union(*results.values()) if k[2] in MAIN_METRICS):
        cells = [f"{results[m][key]:.2f}" if key in results[m] else "–" for m in runs]
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    for part in ("loss", "tft", "lc", "et"):
        cells = [f"{last[m][part]:.3f}" if last[m].get(part) else "–" for m in runs]
        print(f"| train (last step) | vi | {part} | " + " | ".join(cells) + " |")


def plot_losses(runs: dict, path: Path) -> None:
    if plt is None:
        print(f"\nno {path}: matplotlib is not installed (pip install matplotlib, then rerun)")
        return
    rows = {mode: read_metrics(run) for mode, run in runs.items()}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharex=True)
    for ax, part in zip(axes, ("tft", "lc", "et")):
        for mode in runs:
            points = [(r["step"], r[part]) for r in rows[mode] if r.get(part)]
            if points:
                ax.plot(*zip(*points), label=mode)
        ax.set(title=f"L_{part.upper()}", xlabel="optimizer step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nloss curves: {path}")


def main() -> None:
    print(NOTE)
    runs = run_demo(OUT)
    print_table(runs)
    plot_losses(runs, OUT / "loss_curves.png")
    print("\n" + NOTE)


if __name__ == "__main__":
    main()
