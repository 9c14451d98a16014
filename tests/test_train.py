"""train.py end to end on CPU (gloo) with tiny models: 2 processes vs 1 process (losses step by
step, gradient norms and AdamW's moments), kill -9 and SIGTERM then resume, the HF export read by
transformers, one-line errors for bad input, the loss going down, the learning-rate schedule
against a hand-written table, and the length grouping of a step's examples.

The single-process references run in this process (train.main), the distributed runs under
torchrun, so the two sides share no process state. Each run is a few seconds; the suite's time goes
mostly into starting processes.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import prepare_data
import train
from conftest import ROOT
from model import (DFTConfig, Transformer, count_targets, load_weights, read_args,
                   write_tiny_checkpoint)
from model import main as model_main

# Global batch 8 over 40 training examples (48 minus 7 held out, minus the partial last batch):
# 5 steps per epoch, 2 epochs. --max-grad-norm is far below the gradient norms (~1), so every step
# is clipped.
COMMON = ["--lang", "vi", "--global-batch", "8", "--epochs", "2", "--lr", "3e-3",
          "--max-grad-norm", "0.05", "--warmup-ratio", "0.1", "--seed", "3", "--save-every", "3",
          "--val-size", "7", "--eval-every", "5"]
STEPS = 10


def alpaca_pairs(n: int = 48):
    """Short English/Vietnamese Alpaca records, aligned by index: sums of two numbers, some with an
    input."""
    en = []
    vi = []
    for k in range(n):
        a = (7 * k) % 13
        b = (5 * k + 3) % 11
        if k % 3 == 0:
            en.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}",
                       "output": f"The sum is {a + b}."})
            vi.append({"instruction": "Cộng hai số.", "input": f"{a} và {b}",
                       "output": f"Tổng là {a + b}."})
        else:
            en.append({"instruction": f"What is {a} plus {b}?", "input": "",
                       "output": f"{a} plus {b} is {a + b}."})
            vi.append({"instruction": f"{a} cộng {b} bằng bao nhiêu?", "input": "",
                       "output": f"{a} cộng {b} là {a + b}."})
        if k % 6 == 1:  # a long answer (~330 tokens), for truncated data
            en[-1]["output"] = " ".join([en[-1]["output"]] * 30)
            vi[-1]["output"] = " ".join([vi[-1]["output"]] * 30)
    return en, vi


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    en, vi = alpaca_pairs()
    (root / "en.json").write_text(json.dumps(en, ensure_ascii=False), encoding="utf-8")
    (root / "vi.json").write_text(json.dumps(vi, ensure_ascii=False), encoding="utf-8")
    template = [prepare_data.PROMPT_WITH_INPUT, prepare_data.PROMPT_NO_INPUT]
    fields = ("instruction", "input", "output")
    texts = template * 4 + [r[k] for r in en + vi for k in fields if r[k]]
    for family in ("llama", "gemma2"):
        write_tiny_checkpoint(root / family, family, texts, vocab_size=320)
        # Truncated data for the tests below (2 processes, resume): 400 tokens cut the long answers
        # (tft, et) and the lc sequences of the pairs with an input, keeping content in every one.
        report = prepare(root, root / f"{family}-vi", "--tokenizer", root / family,
                         "--max-len", 400)
        assert not report["dropped"]
        assert sum(stats["truncated"] > 0 for stats in report["sequences"].values()) >= 2
    return root


def prepare(setup, out, *flags):
    """prepare_data.py on the test's pairs (vi unless --sft or --lang says otherwise)."""
    sides = ["--en", setup / "en.json"]
    if "--sft" not in flags:
        sides += ["--tgt", setup / "vi.json"] + ([] if "--lang" in flags else ["--lang", "vi"])
    return prepare_data.main([str(a) for a in sides + ["--out", out, *flags]])


def model_flags(setup, family):
    return ["--model", str(setup / family), "--data", str(setup / f"{family}-vi")]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_here(argv):
    """train.main in this process: world size 1, no torchrun."""
    torch.set_num_threads(1)
    train.main([str(a) for a in argv])


def train_cmd(argv):
    return [sys.executable, str(ROOT / "train.py")] + [str(a) for a in argv]


def torchrun_cmd(argv, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc), str(ROOT / "train.py")] + [str(a) for a in argv]


def subprocess_env():
    # One thread per process: the machine has 2 cores, and oversubscribed OpenMP threads spin.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_torchrun(argv, nproc=2):
    done = run(torchrun_cmd(argv, nproc))
    assert done.returncode == 0, done.stderr[-4000:]
    return done


# Runs shared by several tests (each test still works alone: whatever it needs is run on first use).
_runs = {}


def reference_run(setup, mode, family):
    """One process, micro-batches of 4 (accumulation 2), the full 10 steps."""
    key = (mode, family)
    if key not in _runs:
        out = setup / f"ref-{mode}-{family}"
        rng = torch.get_rng_state()
        run_here(COMMON + model_flags(setup, family) + ["--mode", mode, "--batch-size", "4",
                                                        "--out", out])
        # Nothing in a run draws from the global RNG, so a resumed run needs no RNG state to
        # repeat this one.
        assert torch.equal(torch.get_rng_state(), rng)
        _runs[key] = out
    return _runs[key]


def adam_moments(ckpt, parameters: dict) -> dict:
    """AdamW's exp_avg and exp_avg_sq of every parameter, read from a training checkpoint (DCP)."""
    state = {name: {"exp_avg": torch.empty_like(p), "exp_avg_sq": torch.empty_like(p)}
             for name, p in parameters.items()}
    dcp.load({"optim": {"state": state}}, checkpoint_id=str(ckpt), no_dist=True)
    return state


# ---------------------------------------------------------------------------------------------
# Pure functions

def test_get_lr_table():
    # total 100, warmup 10, peak 1: warmup (step+1)/10, then 0.5 (1 + cos(pi (step - 10) / 90)) by
    # hand: progress 0 -> 1, 1/3 -> 0.75, 1/2 -> 0.5, 2/3 -> 0.25, 1 -> 0.
    table = [(0, 0.1), (4, 0.5), (9, 1.0), (10, 1.0), (40, 0.75), (55, 0.5), (70, 0.25),
             (100, 0.0), (120, 0.0)]
    for step, expected in table:
        assert train.get_lr(step, 100, 10, 1.0) == pytest.approx(expected, abs=1e-12), step
    # No warmup: the cosine starts at the peak.
    assert train.get_lr(0, 4, 0, 2e-5) == pytest.approx(2e-5)
    assert train.get_lr(2, 4, 0, 2e-5) == pytest.approx(1e-5)
    assert train.get_lr(0, 1218, 37, 2e-5) == pytest.approx(2e-5 / 37)  # the 7B recipe's first step


def test_group_by_length_pairs_rows_by_every_pass_length():
    # Two passes; rows 0 and 2 are long in the first, 1 and 3 in the second. Every row has the same
    # total, so a sort by total would keep the order and pair 0 with 1: 2 rows x (10 + 10) per
    # micro-batch, 80 for 44 real tokens.
    lengths = torch.tensor([[10, 1], [1, 10], [10, 1], [1, 10]])
    assert train.group_by_length(lengths, world=1, batch_size=2) == [[[0, 2], [1, 3]]]
    padded = train.padded_tokens(lengths[[0, 2]]) + train.padded_tokens(lengths[[1, 3]])
    assert padded == 44
    # One pass: the two longest together; on 2 ranks each takes one micro-batch.
    lengths = torch.tensor([[1], [10], [2], [9]])
    assert train.group_by_length(lengths, world=1, batch_size=2) == [[[1, 3], [0, 2]]]
    assert train.group_by_length(lengths, world=2, batch_size=2) == [[[1, 3]], [[0, 2]]]
    # Fewer rows than micro-batches (a small validation set): a rank may get an empty one, never a
    # missing one.
    assert train.group_by_length(lengths[:1], world=2, batch_size=4) == [[[0]], [[]]]


@pytest.mark.parametrize("mode,prefix_share", [("dft-logits", True), ("dft-logits", False),
                                                ("dft-feature", True), ("tft", True)])
def test_pass_lengths_count_what_dft_step_runs(setup, mode, prefix_share):
    """Padded tokens: what the model's passes really embed (B x T each); real tokens: by hand from
    the masks."""
    dataset = prepare_data.load_prepared(setup / "llama-vi")
    examples = [dataset[i] for i in range(5)]
    batch = prepare_data.collate(examples, pad_id=0)
    dft = DFTConfig(prefix_share=prefix_share)
    lc_type, et_type = dft.types(mode)
    lengths = train.pass_lengths(examples, lc_type, et_type, prefix_share)

    model = Transformer.from_pretrained(setup / "llama")
    embedded = []
    model.tok_embeddings.register_forward_pre_hook(
        lambda module, inputs: embedded.append(inputs[0].numel()))
    with torch.no_grad():
        model.dft_step(batch, mode, dft, count_targets(batch, mode, dft))
    assert sum(embedded) == train.padded_tokens(lengths)

    prompt = batch["tgt_prompt_len"]
    real = {"tft": batch["tft_mask"].sum(), "en": batch["en_mask"].sum()}
    for kind in ("lc", "et"):
        real[kind] = batch[f"{kind}_mask"].sum() - (prompt.sum() if prefix_share else 0)
    runs = {"dft-logits": ("tft", "lc", "et"), "dft-feature": ("tft", "en"), "tft": ("tft",)}[mode]
    assert int(lengths.sum()) == sum(int(real[k]) for k in runs)


@pytest.fixture(scope="module")
def bundled_vi(tmp_path_factory):
    """The bundled Vietnamese sample prepared with a tiny LLaMA tokenizer (python model.py
    --make-tiny, as the demo does); --max-len 1024 keeps all 120 pairs."""
    root = tmp_path_factory.mktemp("bundled")
    model_main(["--make-tiny", str(root / "tiny-llama"), "--family", "llama"])
    prepare_data.main(["--lang", "vi", "--tokenizer", str(root / "tiny-llama"),
                       "--out", str(root / "vi"), "--max-len", "1024"])
    return prepare_data.load_prepared(root / "vi")


@pytest.mark.parametrize("world", [1, 8])
def test_length_grouping_on_the_bundled_sample(bundled_vi, world):
    """The default flags' shape (all 120 examples as one step, micro-batches of 4) on 1 and 8
    ranks: every example once, as many micro-batches on every rank, and padding down to at most
    10 % of the real tokens."""
    examples = [bundled_vi[i] for i in range(len(bundled_vi))]
    assert len(examples) == 120
    order = torch.randperm(120, generator=torch.Generator().manual_seed(0)).tolist()  # an epoch's
    for lc_type, et_type in (("logits", "logits"), ("feature", "feature"), ("none", "none")):
        lengths = train.pass_lengths(examples, lc_type, et_type, True)
        plan = train.group_by_length(lengths, world, batch_size=4)
        groups = [group for rank_groups in plan for group in rank_groups]
        assert len(plan) == world and len({len(rank_groups) for rank_groups in plan}) == 1
        assert sorted(i for group in groups for i in group) == list(range(120))
        assert all(1 <= len(group) <= 4 for group in groups)
        grouped = sum(train.padded_tokens(lengths[group]) for group in groups)
        # Before: each rank a contiguous slice of the epoch's order, cut into micro-batches in that
        # order.
        per_rank = 120 // world
        contiguous = [order[r * per_rank:(r + 1) * per_rank][m:m + 4] for r in range(world)
                      for m in range(0, per_rank, 4)]
        before = sum(train.padded_tokens(lengths[group]) for group in contiguous)
        real = int(lengths.sum())
        assert grouped / real <= 1.10 and grouped < before, (lc_type, grouped / real,
                                                              before / real)


def test_help_shows_every_default_and_needs_no_other_document(capsys):
    with pytest.raises(SystemExit) as caught:
        train.parse_args(["--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    assert ".md" not in text.replace("README", "")
    # One block per option: from its "  --flag" line to the next option or blank line.
    blocks = re.findall(r"^  --\S+.*?(?=^  -|^$)", text, flags=re.M | re.S)
    assert len(blocks) > 25
    for block in blocks:
        assert "default" in block or "required" in block, block
    eval_every = next(b for b in blocks if b.startswith("  --eval-every"))
    assert "needs --val-size" in " ".join(eval_every.split()).replace("- ", "-"), eval_every


def test_cuda_compiles_and_fuses_adamw_while_the_cpu_default_stays_eager(tiny_llama):
    argv = ["--lang", "vi"]
    cpu = train.resolve_config(train.parse_args(argv), 1, "cpu")
    cuda = train.resolve_config(train.parse_args(argv), 8, "cuda")
    assert (cpu.compile, cpu.dtype) == (False, "fp32")
    assert (cuda.compile, cuda.dtype) == (True, "bf16")
    no_compile = train.resolve_config(train.parse_args(argv + ["--no-compile"]), 8, "cuda")
    assert no_compile.compile is False
    assert train.resolve_config(train.parse_args(argv + ["--compile"]), 1, "cpu").compile is True
    model = Transformer.from_pretrained(tiny_llama)
    assert train.make_optimizer(model, cpu, torch.device("cpu")).defaults["fused"] is None
    assert train.make_optimizer(model, cuda, torch.device("cuda")).defaults["fused"] is True


def test_resume_allows_speed_flags_and_refuses_flags_that_change_the_run(tmp_path):
    def config(*flags):
        return train.resolve_config(train.parse_args(["--lang", "vi", *flags]), 1, "cpu")

    data = {"identity": "abc", "meta": {"max_len": 512}}
    (tmp_path / "state.json").write_text(json.dumps({"config": asdict(config()), "data": data}))
    for speed in (["--chunk-size", "64"], ["--no-prefix-share"], ["--batch-size", "2"],
                  ["--compile"]):
        train.read_resume_state(tmp_path, config(*speed), data)
    with pytest.raises(SystemExit) as caught:
        train.read_resume_state(tmp_path, config("--lc-weight", "0.5", "--pooling", "last"), data)
    expected = "written by a run with --lc-weight 1.0 (now 0.5), --pooling mean (now last)"
    assert expected in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Training runs

@pytest.mark.parametrize("mode,family", [("tft", "llama"), ("dft-logits", "llama"),
                                         ("dft-feature", "gemma2")])
def test_two_processes_equal_one(setup, mode, family):
    ref = reference_run(setup, mode, family)
    out = setup / f"two-{mode}-{family}"
    # 2 ranks x micro-batches of 1 (accumulation 4) against 1 rank x micro-batches of 4
    # (accumulation 2); the DFT-logits run (three passes per micro-batch) also recomputes its
    # blocks (activation checkpointing).
    recompute = ["--activation-checkpointing"] if mode == "dft-logits" else []
    run_torchrun(COMMON + model_flags(setup, family) + recompute
                 + ["--mode", mode, "--batch-size", "1", "--out", out])
    one = read_metrics(ref)
    two = read_metrics(out)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        assert a["grad_norm"] > 0.05 * 5, "clipping must be active for this test to mean anything"
        for key in ("loss", "tft", "lc", "et", "val_loss", "val_tft", "val_lc", "val_et"):
            if key in a or key in b:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
        # The same examples per step, however they are split: the same real tokens.
        assert b["tokens"] == a["tokens"] and a["tokens"] < a["padded_tokens"], a["step"]
        # Norms reach ~10 in gradient spikes, where fp32 summation order alone moves the 6th digit.
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
    if mode != "tft":
        assert all(r["lc"] > 0 and r["et"] > 0 for r in one)
    else:
        assert all(r["lc"] == 0 and r["et"] == 0 for r in one)

    # Gradients, not only losses (AdamW would hide a constant factor from them): their norms before
    # clipping are compared above at every step; their directions, parameter by parameter, through
    # the moving averages of the clipped gradients AdamW keeps (step 10's checkpoint holds
    # 0.1 * sum_k 0.9^(10-k) * clipped g_k).
    names = dict(Transformer.from_pretrained(setup / family).named_parameters())
    moments_one = adam_moments(ref / "ckpt" / f"step_{STEPS}", names)
    moments_two = adam_moments(out / "ckpt" / f"step_{STEPS}", names)
    for name in names:
        for moment in ("exp_avg", "exp_avg_sq"):
            expected = moments_one[name][moment]
            assert expected.abs().max() > 0, (name, moment)
            torch.testing.assert_close(moments_two[name][moment], expected, rtol=1e-3,
                                       atol=1e-4 * float(expected.abs().max()),
                                       msg=f"{name} {moment}")


def test_bf16_fsdp_blocks_get_fp32_rope_tables_and_match_the_plain_bf16_model(tiny_llama):
    """Under bf16 mixed precision FSDP casts a block's floating inputs to bf16 unless told not to:
    the RoPE tables must arrive in fp32 (as in the unwrapped model, e.g. in evaluate.py) and the
    hidden states in bf16."""
    args = read_args(tiny_llama)
    tokens = torch.randint(3, args.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    plain = Transformer.from_pretrained(tiny_llama).to(torch.bfloat16)
    with torch.no_grad():
        expected = plain(tokens)
    train.init_distributed(torch.device("cpu"))                  # gloo, one process
    try:
        with torch.device("meta"):
            model = Transformer(args)
        train.apply_fsdp(model, bf16=True, activation_checkpointing=False, compile=False)
        model.to_empty(device="cpu")
        load_weights(model, tiny_llama)
        received = []
        model.layers[1].register_forward_pre_hook(
            lambda block, inputs, kwargs: received.append([t.dtype for t in inputs[:3]]),
            with_kwargs=True)
        with torch.no_grad():
            logits = model(tokens)
    finally:
        dist.destroy_process_group()
    assert received == [[torch.bfloat16, torch.float32, torch.float32]]   # hidden states, cos, sin
    # The same bf16 weights and fp32 tables: the same numbers (bf16 tables moved them by ~5e-3).
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_compiled_blocks_do_not_recompile_for_new_sequence_lengths(setup, monkeypatch):
    """apply_fsdp's compile, run by dynamo with the eager backend (inductor needs a GPU to pay
    off): six micro-batches of different lengths through DFT-logits steps compile each kind of
    block call once."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda module, **options: compile_module(module, backend="eager",
                                                                 **options))
    torch._dynamo.reset()
    dataset = prepare_data.load_prepared(setup / "llama-vi")
    dft = DFTConfig()
    graphs = []
    compiled_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]   # by other tests
    train.init_distributed(torch.device("cpu"))
    try:
        with torch.device("meta"):
            model = Transformer(read_args(setup / "llama"))
        train.apply_fsdp(model, bf16=False, activation_checkpointing=False, compile=True)
        model.to_empty(device="cpu")
        load_weights(model, setup / "llama")
        by_length = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["tft_tokens"]))
        lengths = set()
        for start in range(0, 48, 8):          # pairs from shortest to longest
            batch = prepare_data.collate([dataset[i] for i in by_length[start:start + 2]], 0)
            lengths.add(batch["tft_tokens"].shape[1])
            counts = count_targets(batch, "dft-logits", dft)
            model.dft_step(batch, "dft-logits", dft, counts)["loss"].backward()
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - compiled_before)
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
    assert len(lengths) >= 4
    # One graph for the TFT pass's block calls, one for the shared-prefix ones.
    assert graphs == [graphs[0]] * 6 and graphs[0] <= 2, graphs


def test_sigterm_and_kill_9_then_resume_give_the_uninterrupted_losses(setup):
    ref = read_metrics(reference_run(setup, "dft-logits", "llama"))
    out = setup / "interrupted"
    cmd = train_cmd(COMMON + model_flags(setup, "llama")
                    + ["--mode", "dft-logits", "--batch-size", "2", "--out", out])

    def start_and_wait_for(rows):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= rows:
                return proc
            time.sleep(0.01)
        raise AssertionError(f"run ended or stalled before step {rows}: "
                             f"{proc.communicate()[1][-3000:]}")

    # SIGTERM after step 2: the step in flight is finished and checkpointed, the run exits 0
    # without exporting.
    proc = start_and_wait_for(2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped_at = len(read_metrics(out))
    assert 2 <= stopped_at < STEPS and "stopped by signal" in err
    assert (out / "ckpt" / f"step_{stopped_at}" / "state.json").is_file()
    assert not (out / "final").exists()

    # The same command resumes; kill -9 (the whole process group) a few steps later, whatever it
    # is doing.
    proc = start_and_wait_for(stopped_at + 3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert len(read_metrics(out)) < STEPS, "the kill came too late to interrupt the run"
    (out / "ckpt" / "step_99.tmp").mkdir()        # an unfinished checkpoint write must be ignored

    done = run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for a, b in zip(ref, rows):
        for key in ("loss", "tft", "lc", "et", "lr"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
    # --keep-last 2; unfinished writes of the killed run (and the planted one) were cleared.
    assert sorted(d.name for d in (out / "ckpt").iterdir()) == ["step_10", "step_9"]
    assert (out / "final" / "model.safetensors").is_file()


def test_resume_on_re_prepared_data_is_refused(setup, tmp_path):
    """prepare_data.py rerun into the same dir with another --max-len, then the same train.py
    command: the checkpoint was made on other data, so resuming (a jump in epoch and learning
    rate) is refused in one line."""
    data = tmp_path / "vi"
    prepare(setup, data, "--tokenizer", setup / "llama")
    out = tmp_path / "run"
    argv = COMMON + ["--model", setup / "llama", "--data", data, "--mode", "tft",
                     "--batch-size", "8", "--out", out, "--max-steps", "3"]
    run_here(argv)
    assert (out / "ckpt" / "step_3").is_dir()
    prepare(setup, tmp_path / "vi-400", "--tokenizer", setup / "llama", "--max-len", "400")
    shutil.rmtree(data)
    os.rename(tmp_path / "vi-400", data)
    with pytest.raises(SystemExit) as caught:
        run_here(argv)
    message = str(caught.value.code)
    # The flag that changed first, then the counts it led to.
    assert "\n" not in message
    assert f"{data} changed since this checkpoint (max_len 512 -> 400, " in message
    assert "another --out" in message


def test_nan_loss_stops_naming_the_step(setup, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (setup / "llama").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.2.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run"
    done = run(train_cmd(COMMON + ["--model", broken, "--data", setup / "llama-vi",
                                   "--batch-size", "8", "--out", out]))
    assert done.returncode == train.EXIT_ONE_LINE, done.stderr[-3000:]
    # The message is the last thing printed: the progress bar was closed before it, not left to
    # print itself (as "dft-logits vi: 0%| 0/10") when the interpreter collects it.
    last_line = done.stderr.rstrip().split("\n")[-1]
    assert last_line.startswith("step 1: loss is nan"), done.stderr
    assert last_line.endswith("(no checkpoint was written yet); try a lower --lr"), done.stderr
    assert done.stderr.count("step 1: loss is nan") == 1
    assert not (out / "ckpt").exists() and not (out / "metrics.jsonl").read_text()


def test_loss_goes_down(setup):
    rows = read_metrics(reference_run(setup, "dft-logits", "llama"))
    for part in ("tft", "lc", "et"):
        assert rows[-1][part] < rows[0][part] - 0.1, part
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [5, 10]
    for part in ("val_tft", "val_lc", "val_et"):
        assert val[1][part] < val[0][part], part
    # Warmup of 1 step, then the cosine towards 0.
    assert rows[0]["lr"] == pytest.approx(3e-3) and rows[-1]["lr"] < 3e-4


def test_export_loads_in_transformers_with_our_logits(setup):
    out = reference_run(setup, "dft-logits", "llama")
    final = out / "final"
    source = setup / "llama"
    for name in ("config.json", "tokenizer.model", "generation_config.json"):
        assert (final / name).read_bytes() == (source / name).read_bytes(), name

    # The exported tensors are the trained ones: compare with the last training checkpoint read
    # through DCP.
    exported = load_file(final / "model.safetensors")
    ours = Transformer.from_pretrained(final)
    names = dict(ours.named_parameters())
    trained = {"model": {name: torch.empty_like(p) for name, p in names.items()}}
    dcp.load(trained, checkpoint_id=str(out / "ckpt" / f"step_{STEPS}"), no_dist=True)
    initial = dict(Transformer.from_pretrained(source).named_parameters())
    for name, p in names.items():
        torch.testing.assert_close(p.detach(), trained["model"][name], rtol=0, atol=0, msg=name)
        assert not torch.equal(p, initial[name]), f"{name} did not change in training"
    assert len(exported) == len(names)

    hf = AutoModelForCausalLM.from_pretrained(final, torch_dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, read_args(final).vocab_size, (2, 21), generator=generator)
    with torch.no_grad():
        theirs = hf(tokens).logits
        mine = ours(tokens)
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_sft_mode_trains_on_english_only_data(setup, tmp_path):
    """The SFT baseline: English-only data (only the tft keys) trains, its loss falls, and it
    exports."""
    data = tmp_path / "sft-en"
    prepare(setup, data, "--sft", "--tokenizer", setup / "llama")
    out = tmp_path / "run"
    run_here(["--mode", "sft", "--model", setup / "llama", "--data", data, "--out", out,
              "--global-batch", "8", "--epochs", "2", "--lr", "3e-3", "--warmup-ratio", "0.1"])
    rows = read_metrics(out)
    assert len(rows) == 12 and rows[-1]["tft"] < rows[0]["tft"]
    assert not rows[-1]["lc"] and not rows[-1]["et"]
    # An epoch (6 steps of 8) reads each of the 48 examples once: the real tokens are theirs.
    dataset = prepare_data.load_prepared(data)
    epoch_tokens = sum(len(dataset[i]["tft_tokens"]) for i in range(48))
    assert sum(r["tokens"] for r in rows[:6]) == epoch_tokens
    assert (out / "final" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# Bad input: one line, before any work (no output directory, no process group)

def bad_input(setup, tmp_path, extra, **env):
    out = tmp_path / "run"
    argv = COMMON + model_flags(setup, "llama") + ["--out", out] + extra
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with pytest.raises(SystemExit) as caught:
            run_here(argv)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    message = str(caught.value.code)
    assert "\n" not in message and message, message
    assert not out.exists(), "the run started working before refusing its input"
    assert not dist.is_initialized()
    return message


def test_missing_model_and_data_name_the_command_that_makes_them(setup, tmp_path):
    message = bad_input(setup, tmp_path, ["--model", tmp_path / "no-model"])
    assert "no-model/config.json: not found" in message
    # The real model's download under the name --model gives; a tiny random model only under its
    # own name.
    real = tmp_path / "Llama-2-7b-hf"
    message = bad_input(setup, tmp_path, ["--model", real])
    assert f"huggingface-cli download meta-llama/Llama-2-7b-hf --local-dir {real} " in message
    assert "python model.py --make-tiny models/tiny-llama --family llama" in message
    assert "--model models/tiny-llama" in message and f"--make-tiny {real}" not in message
    message = bad_input(setup, tmp_path, ["--model", tmp_path / "gemma-2-2b"])
    assert "huggingface-cli download google/gemma-2-2b " in message
    message = bad_input(setup, tmp_path, ["--data", tmp_path / "no-data"])
    assert "no-data/meta.json" in message and "python prepare_data.py --lang vi" in message
    # As the user sees it: one line on stderr, no traceback.
    done = run(train_cmd(COMMON + ["--model", tmp_path / "no-model", "--out", tmp_path / "x"]),
               timeout=120)
    assert done.returncode == train.EXIT_ONE_LINE, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "huggingface-cli download" in done.stderr


def test_bad_flag_under_torchrun_is_printed_once_without_our_traceback(setup, tmp_path):
    """Every rank refuses the same flag; rank 0 prints the line, all exit with EXIT_ONE_LINE and no
    traceback of ours. (torchrun's launcher still raises its own ChildFailedError for any worker
    that exits nonzero: its traceback, in torch/distributed, and its summary box follow; they name
    exit code 2.)"""
    argv = COMMON + model_flags(setup, "llama") + ["--batch-size", "3", "--out", tmp_path / "run"]
    done = run(torchrun_cmd(argv))
    output = done.stdout + done.stderr
    message = "--global-batch 8 is not a multiple of --batch-size 3 x 2 process(es) = 6"
    assert done.returncode != 0 and output.count(message) == 1, output
    assert "train.py\", line" not in output and "SystemExit" not in output, output
    assert "exitcode  : 2 " in output and not (tmp_path / "run").exists()
    # argparse's own errors are one line too (its default adds a usage block).
    message = bad_input(setup, tmp_path, ["--mode", "bogus"])
    assert message.startswith("train.py: argument --mode: invalid choice: 'bogus'"), message


def test_impossible_or_unwritable_out_is_refused_in_one_line(setup, tmp_path, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for out, reason in ((a_file, "File exists"), (a_file / "run", "Not a directory"),
                        (Path("/proc/dft-run"), "No such file or directory")):
        with pytest.raises(SystemExit) as caught:
            run_here(COMMON + model_flags(setup, "llama") + ["--out", out])
        assert str(caught.value.code) == f"--out {out}: {reason}; choose a path where you can write"
    # No write permission (the tests run as root here, who may write anyway: the permission check
    # is faked).
    monkeypatch.setattr(train.os, "access", lambda path, mode: False)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as caught:
        run_here(COMMON + model_flags(setup, "llama") + ["--out", out])
    assert str(caught.value.code) == f"--out {out}: not writable; choose a path where you can write"


def test_data_for_another_language_tokenizer_or_mode_is_refused(setup, tmp_path):
    # The Vietnamese file, declared as Chinese: what counts is what meta.json says.
    zh = tmp_path / "zh"
    prepare(setup, zh, "--lang", "zh", "--tokenizer", setup / "llama")
    assert "lang='zh'" in bad_input(setup, tmp_path, ["--data", zh])
    assert "another tokenizer" in bad_input(setup, tmp_path, ["--data", setup / "gemma2-vi"])
    sft = tmp_path / "sft"
    prepare(setup, sft, "--sft", "--tokenizer", setup / "llama")
    assert "mode='sft'" in bad_input(setup, tmp_path, ["--data", sft, "--mode", "tft"])
    # vi data for an SFT run:
    assert "mode='parallel'" in bad_input(setup, tmp_path, ["--mode", "sft"])


def test_layer_beyond_depth_and_impossible_batch_split_are_refused(setup, tmp_path):
    # The tiny model has 4 blocks.
    assert "--lc-layer 5: the model has 4 blocks" in bad_input(setup, tmp_path, ["--lc-layer", "5"])
    assert "--et-layer 0" in bad_input(setup, tmp_path, ["--et-layer", "0"])
    message = bad_input(setup, tmp_path, ["--global-batch", "10", "--batch-size", "4"])
    assert "--global-batch 10" in message
    message = bad_input(setup, tmp_path, ["--batch-size", "2"], WORLD_SIZE="3")   # 8 % (2 x 3)
    assert "3 process(es)" in message
    # Only 41 training examples:
    assert "--global-batch 64" in bad_input(setup, tmp_path, ["--global-batch", "64"])
    assert "--lc-type" in bad_input(setup, tmp_path, ["--mode", "sft", "--lc-type", "logits"])
