"""python demo.py as the README's first command runs it: every stage, the side-by-side table, then
a rerun that reuses every stage."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def run_demo(cwd, timeout):
    return subprocess.run([sys.executable, str(ROOT / "demo.py")], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def test_demo_runs_end_to_end_and_a_rerun_reuses_every_stage(tmp_path):
    done = run_demo(tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| task | lang | metric | tft | dft-logits |" in done.stdout
    assert "| xnli | vi | acc |" in done.stdout
    assert "| train (last step) | vi | lc | – |" in done.stdout
    assert "say nothing about the method's effect" in done.stdout
    for mode in ("tft", "dft-logits"):
        run = tmp_path / "runs" / "demo" / mode
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["epoch"] == 2 and rows[-1]["tft"] < rows[0]["tft"] - 0.5, rows
        assert (run / "final" / "eval" / "results.json").is_file()
    rerun = run_demo(tmp_path, timeout=300)
    assert rerun.returncode == 0 and rerun.stdout.count("(done before: reused)") == 6, rerun.stdout
