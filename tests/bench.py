"""The project's one benchmark: every speed and memory figure, measured side by side in one run, as ratios.

    python tests/bench.py                      # CPU, a few minutes
    python tests/bench.py --device cuda        # adds tokens/s and MFU at Gemma-2-2B / LLaMA-2-7B shapes
    python tests/bench.py --only model,dft     # sections: model, dft, ce, padding, prepare, decode, gpu

Not collected by pytest and not a test: these machines are shared and noisy, so every comparison alternates its two
sides (A B A B ...) and reports the median of the per-pair ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import torch.distributed as dist  # noqa: E402
from dsft_loss import logit_lens_ce  # noqa: E402
from model import DFTConfig, ModelArgs, Transformer, count_targets, write_tiny_checkpoint  # noqa: E402
from prepare_data import collate, load_prepared  # noqa: E402
from train import (TrainConfig, apply_fsdp, forward_backward, global_counts, group_by_length,  # noqa: E402
                   make_optimizer, on_device, pass_lengths, padded_tokens)

SUMMARY: list[tuple[str, str, str]] = []    # (section, figure, value)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def paired_ratio(fn_a, fn_b, device, reps: int) -> tuple[float, float, float]:
    """Median seconds of a, of b, and the median of the per-pair ratios a/b, alternating a and b."""
    fn_a(), fn_b()                                          # warm-up
    ta, tb = [], []
    for _ in range(reps):
        for fn, acc in ((fn_a, ta), (fn_b, tb)):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb), statistics.median(a / b for a, b in zip(ta, tb))


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so
    a probe started from a big parent would report the parent's size."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(title, header, rows):
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


# --- model: our forward+backward vs transformers ------------------------------------------------------------------------

def reduced_config(family: str, n_layers: int, dim: int, vocab: int) -> ModelArgs:
    """The real model's shape at reduced width: head_dim, GQA ratio, MLP ratio and the family's quirks kept.
    llama: LLaMA-2-7B; llama3: LLaMA-3.1-8B (GQA 4, llama3 RoPE); qwen2: Qwen2.5-7B (GQA 7, q/k/v biases)."""
    if family == "llama":
        return ModelArgs(family="llama", dim=dim, n_layers=n_layers, n_heads=dim // 128, n_kv_heads=dim // 128,
                         head_dim=128, hidden_dim=int(dim * 11008 / 4096), vocab_size=vocab, norm_eps=1e-5)
    if family == "llama3":
        heads = dim // 128
        return ModelArgs(family="llama", dim=dim, n_layers=n_layers, n_heads=heads, n_kv_heads=max(1, heads // 4),
                         head_dim=128, hidden_dim=int(dim * 14336 / 4096), vocab_size=vocab, norm_eps=1e-5,
                         max_seq_len=131072, rope_theta=500000.0, rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                                original_max_position_embeddings=8192))
    if family == "qwen2":
        heads = dim // 128
        return ModelArgs(family="qwen2", dim=dim, n_layers=n_layers, n_heads=heads, n_kv_heads=max(1, heads // 7),
                         head_dim=128, hidden_dim=int(dim * 18944 / 3584), vocab_size=vocab, norm_eps=1e-6,
                         rope_theta=1000000.0, qkv_bias=True)
    heads = max(2, dim // 288)
    return ModelArgs(family="gemma2", dim=dim, n_layers=n_layers, n_heads=heads, n_kv_heads=heads // 2, head_dim=256,
                     hidden_dim=dim * 4, vocab_size=vocab, norm_eps=1e-6, tie_embeddings=True, norm_offset=1.0,
                     mlp_act="gelu_tanh", embed_scale=dim ** 0.5, sandwich_norm=True, query_scale=256 ** -0.5,
                     attn_softcap=50.0, final_softcap=30.0, sliding_window=4096,
                     sliding_layers=tuple(i % 2 == 0 for i in range(n_layers)))


def build(args: ModelArgs, device, dtype=torch.float32) -> Transformer:
    with torch.device(device):
        model = Transformer(args)
    model.init_weights()
    return model.to(dtype)


def bench_model(device, quick):
    import transformers
    from model import hf_config_of

    rows = []
    B, T = (1, 256) if quick else (2, 512)
    for family, dim in (("llama", 512), ("gemma2", 576), ("llama3", 512), ("qwen2", 896)):
        args = reduced_config(family, 4, dim, 32000)
        args.hf_config = hf_config_of(args)
        ours = build(args, device)
        with tempfile.TemporaryDirectory() as d:
            ours.save_pretrained(d)
            ref = transformers.AutoModelForCausalLM.from_pretrained(d).to(device)
        ref.train(), ours.train()
        tokens = torch.randint(0, args.vocab_size, (B, T), device=device)
        labels = tokens.clone()
        shifted = torch.cat([tokens[:, 1:], torch.full((B, 1), -100, device=device)], 1)
        batch = {"tft_tokens": tokens, "tft_labels": shifted, "tft_mask": torch.ones_like(tokens)}
        cfg = DFTConfig()
        counts = count_targets(batch, "tft", cfg)

        def ours_step():
            ours.zero_grad(set_to_none=True)
            ours.dft_step(batch, "tft", cfg, counts)["loss"].backward()

        def ref_step():
            ref.zero_grad(set_to_none=True)
            ref(input_ids=tokens, labels=labels).loss.backward()

        def ours_fwd():
            with torch.no_grad():
                ours(tokens)

        def ref_fwd():
            with torch.no_grad():
                ref(input_ids=tokens)

        reps = 3 if quick else 5
        a, b, r = paired_ratio(ours_step, ref_step, device, reps)
        fa, fb, fr = paired_ratio(ours_fwd, ref_fwd, device, reps)
        name = f"{family} {args.n_layers}x{dim}, V={args.vocab_size}, B={B}, T={T}"
        rows.append((name, f"{a * 1e3:.0f} / {b * 1e3:.0f}", f"{r:.2f}", f"{fa * 1e3:.0f} / {fb * 1e3:.0f}", f"{fr:.2f}"))
        SUMMARY.append(("model", f"fwd+bwd ours/transformers, {family}", f"{r:.2f}x (goal <= 1.0)"))
        SUMMARY.append(("model", f"forward ours/transformers, {family}", f"{fr:.2f}x"))
    table("model.py vs transformers (same weights; training step = ours: hidden_at + chunked CE, theirs: .loss)",
          ["config", "fwd+bwd ms ours / theirs", "ratio", "forward ms ours / theirs", "ratio"], rows)


# --- dft: step time and memory of each mode vs the FLOP and memory models ----------------------------------------------

DFT_SHAPES = {   # depth-faithful, reduced width (vocab/width as in the real models: LLaMA-2 ~8, Gemma-2 ~110)
    "llama": dict(n_layers=32, dim=256, vocab=2048, layers=(2, 15)),
    "gemma2": dict(n_layers=26, dim=128, vocab=14080, layers=(2, 12)),
}
# (label, mode, DFTConfig overrides)
DFT_RUNS = (("tft", "tft", {}), ("dft-logits shared", "dft-logits", {}),
            ("dft-logits plain", "dft-logits", {"prefix_share": False}), ("dft-feature", "dft-feature", {}))


def sample_batch(batch_size: int, workdir: Path) -> dict:
    """A real batch: the bundled vi sample, prepared with a tokenizer trained on it (2048 pieces)."""
    from prepare_data import PrepareConfig, collate, load_prepared, prepare

    model_dir = workdir / "tok"
    if not (model_dir / "tokenizer.model").is_file():
        from model import sample_texts

        write_tiny_checkpoint(model_dir, "llama", sample_texts())
    out = workdir / "prepared-vi"
    if not (out / "meta.json").is_file():
        prepare(PrepareConfig(lang="vi", tokenizer=model_dir, out=out))
    data = load_prepared(out)
    return collate([data[i] for i in range(batch_size)], 0)


def shared_suffix(batch: dict, kind: str) -> tuple[int, int]:
    """(padded length of the part after x_tgt, padded length of x_tgt): what the shared path runs for `kind`."""
    P = batch["tgt_prompt_len"]
    return int((batch[f"{kind}_mask"].sum(1) - P).max()), int(P.max())


def step_flops(args: ModelArgs, batch: dict, mode: str, cfg: DFTConfig) -> float:
    """Forward+backward FLOPs of one dft_step: matmuls of every block pass (QKV/O/MLP + attention scores over the
    padded length) and of every head application (supervised rows only: the chunked CE gathers them).
    Blocks: forward 1x + backward 2x. Head (gradient formed in the forward sweep): logits, d rows and d head = 3x,
    2x when frozen (no weight grad)."""
    D, E, H, K, F, V = args.dim, args.head_dim, args.n_heads, args.n_kv_heads, args.hidden_dim, args.vocab_size
    per_token_block = 2 * (D * E * (H + 2 * K) + H * E * D + 3 * D * F)

    def blocks(tokens, n, backward=True, n_keys=None):
        B, T = tokens.shape
        fwd = n * B * (T * per_token_block + 2 * 2 * T * (n_keys or T) * H * E)
        return fwd * (3 if backward else 1)

    def head(n_rows, frozen):
        return 2 * n_rows * D * V * (2 if frozen else 3)

    lc_type, et_type = cfg.types(mode)
    i, j = cfg.layers(args)
    counts = count_targets(batch, mode, cfg)
    total = blocks(batch["tft_tokens"], args.n_layers) + head(counts["tft"], False)
    for kind, loss_type, k in (("lc", lc_type, i), ("et", et_type, j)):
        if loss_type != "logits":
            continue
        if cfg.prefix_share:          # only the part after x_tgt runs, with keys over x_tgt + that part
            n_rest, n_prompt = shared_suffix(batch, kind)
            total += blocks(batch[f"{kind}_tokens"][:, :n_rest], k, n_keys=n_prompt + n_rest) + head(counts[kind], True)
        else:
            total += blocks(batch[f"{kind}_tokens"], k) + head(counts[kind], True)
    if "feature" in (lc_type, et_type):   # one no-grad English pass: 1..i for LC only, all blocks when ET needs h_N
        total += blocks(batch["en_tokens"], args.n_layers if et_type == "feature" else i, backward=False)
    return total


def kept_for_backward(model, batch, mode, cfg) -> int:
    """Bytes autograd keeps between the end of the forward pass and backward (tensors saved for backward that are
    still alive, one count per storage, parameters excluded)."""
    import gc
    import weakref

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(weakref.ref(t)) or t, lambda t: t):
        out = model.dft_step(batch, mode, cfg, count_targets(batch, mode, cfg))
    gc.collect()
    alive = {}
    for ref in packed:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in params:
            alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del out
    return sum(alive.values())


def saved_bytes_per_block_token(model, batch, cfg) -> float:
    """Activation bytes autograd keeps per block and token, measured on the TFT pass (calibrates the memory model)."""
    return kept_for_backward(model, batch, "tft", cfg) / (model.args.n_layers * batch["tft_tokens"].numel())


def dft_cfg(family: str, overrides: dict) -> DFTConfig:
    i, j = DFT_SHAPES[family]["layers"]
    return DFTConfig(lc_layer=i, et_layer=j, **overrides)


def memory_probe(family: str, run: str, workdir: Path, batch_size: int) -> None:
    """Run in a fresh process: two AdamW steps of one DFT_RUNS entry, print peak RSS (MiB) as JSON."""
    torch.manual_seed(0)
    _, mode, overrides = next(r for r in DFT_RUNS if r[0] == run)
    shape = DFT_SHAPES[family]
    model = build(reduced_config(family, shape["n_layers"], shape["dim"], shape["vocab"]), "cpu")
    batch = sample_batch(batch_size, workdir)
    cfg = dft_cfg(family, overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    counts = count_targets(batch, mode, cfg)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model.dft_step(batch, mode, cfg, counts)["loss"].backward()
        opt.step()
    print(json.dumps({"peak_mib": peak_rss_mib()}))


def aux_activation_bytes(args, batch, run, cfg, per_block_token) -> float:
    """Memory model of what a mode keeps beyond TFT: the blocks it runs with grad x tokens x the bytes per block and
    token that the TFT pass keeps (measured); with prefix sharing also the prompt's keys/values that each block's
    attention holds in front of the suffix's; plus the teachers of the feature losses (no-grad pass)."""
    _, mode, _ = run
    lc_type, et_type = cfg.types(mode)
    i, j = cfg.layers(args)
    total, B = 0.0, batch["tft_tokens"].shape[0]
    for kind, loss_type, k in (("lc", lc_type, i), ("et", et_type, j)):
        if loss_type != "logits":
            continue
        if cfg.prefix_share:
            n_rest, n_prompt = shared_suffix(batch, kind)
            # attention keeps its keys/values: the prompt's, copied in front of the suffix's
            total += per_block_token * k * B * n_rest + k * 2 * B * n_prompt * args.n_kv_heads * args.head_dim * 4
        else:
            total += per_block_token * k * B * batch[f"{kind}_tokens"].shape[1]
    if "feature" in (lc_type, et_type):
        total += 2 * batch["en_tokens"].numel() * args.dim * 4
    return total


def bench_dft(device, quick):
    batch_size = 2 if quick else 4
    workdir = Path(tempfile.mkdtemp(prefix="dft-bench-"))
    batch_cpu = sample_batch(batch_size, workdir)
    batch = {k: v.to(device) for k, v in batch_cpu.items()}
    lengths = {k: tuple(batch_cpu[f"{k}_tokens"].shape) for k in ("tft", "lc", "et", "en")}
    print(f"\nDFT batch from the bundled vi sample: [B, T] = {lengths}, "
          f"x_tgt lengths {batch_cpu['tgt_prompt_len'].tolist()}")
    time_rows, mem_rows = [], []
    for family, shape in DFT_SHAPES.items():
        torch.manual_seed(0)
        args = reduced_config(family, shape["n_layers"], shape["dim"], shape["vocab"])
        model = build(args, device)

        def step(mode, cfg):
            def run():
                model.zero_grad(set_to_none=True)
                model.dft_step(batch, mode, cfg, count_targets(batch, mode, cfg))["loss"].backward()
            return run

        tft_cfg = dft_cfg(family, {})
        flops_tft = step_flops(args, batch, "tft", tft_cfg)
        for run in DFT_RUNS[1:]:
            label, mode, overrides = run
            cfg = dft_cfg(family, overrides)
            t_mode, t_tft, ratio = paired_ratio(step(mode, cfg), step("tft", tft_cfg), device, 2 if quick else 4)
            ideal = step_flops(args, batch, mode, cfg) / flops_tft
            time_rows.append((family, label, f"{t_mode:.2f} / {t_tft:.2f}", f"{ratio:.2f}", f"{ideal:.2f}",
                              f"{ratio / ideal:.2f}"))
            SUMMARY.append(("dft", f"{family} {label} / tft time", f"{ratio:.2f}x vs FLOP model {ideal:.2f}x "
                                                                    f"(measured/model {ratio / ideal:.2f}, goal <= 1.10)"))

        if device.type != "cpu":
            continue
        per_bt = saved_bytes_per_block_token(model, batch, tft_cfg)
        peaks = {}
        for label, _, _ in DFT_RUNS:
            proc = subprocess.run([sys.executable, __file__, "--memory-probe", family, label, str(workdir),
                                   str(batch_size)], capture_output=True, text=True, check=True)
            peaks[label] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
        kept_tft = kept_for_backward(model, batch, "tft", tft_cfg)
        for run in DFT_RUNS[1:]:
            label, mode, overrides = run
            cfg = dft_cfg(family, overrides)
            kept_extra = (kept_for_backward(model, batch, mode, cfg) - kept_tft) / 2**20
            rss_extra = peaks[label] - peaks["tft"]
            model_mib = aux_activation_bytes(args, batch_cpu, run, cfg, per_bt) / 2**20
            mem_rows.append((family, label, f"{kept_extra:.0f}", f"{model_mib:.0f}",
                             f"{kept_extra / model_mib:.2f}" if model_mib > 8 else "-",
                             f"{peaks[label]:.0f} / {peaks['tft']:.0f}", f"{rss_extra:.0f}"))
            SUMMARY.append(("dft", f"{family} {label} extra memory kept for backward",
                            f"{kept_extra:.0f} MiB vs model {model_mib:.0f} MiB; peak RSS +{rss_extra:.0f} MiB"))
        del model

    table("DFT step time / TFT step time (same process, alternating) beside the FLOP model",
          ["model", "mode", "s/step mode / tft", "measured ratio", "FLOP-model ratio", "measured / model"], time_rows)
    if mem_rows:
        table("DFT memory over TFT: what autograd keeps from forward to backward (measured) beside the memory model "
              "(aux blocks x tokens x TFT's measured bytes per block-token), and the peak RSS of a fresh process per "
              "mode (2 AdamW steps; the peak can fall in TFT's backward, after the aux activations are freed)",
              ["model", "mode", "extra kept MiB", "model MiB", "kept / model", "peak RSS MiB mode / tft",
               "peak RSS extra MiB"], mem_rows)


# --- ce: the chunked logit-lens CE against the plain autograd formula ------------------------------------------------

CE_SHAPE = dict(rows=2048, dim=256, vocab=32000, chunk=1024)    # Gemma-2's softcap 30 or none; fp32


def ce_inputs(device, softcap_text: str, freeze: bool):
    torch.manual_seed(0)
    n, d, v = CE_SHAPE["rows"], CE_SHAPE["dim"], CE_SHAPE["vocab"]
    norm = torch.nn.RMSNorm(d, device=device)
    head = (torch.randn(v, d, device=device) * 0.05).requires_grad_(not freeze)
    hidden = torch.randn(1, n, d, device=device, requires_grad=True)
    labels = torch.randint(0, v, (1, n), device=device)
    return norm, head, hidden, labels, None if softcap_text == "none" else float(softcap_text)


def ce_step(impl: str, norm, head, hidden, labels, softcap, freeze: bool):
    """One loss + backward: ours (logit_lens_ce), or the formula as autograd runs it (full logits)."""
    def run():
        if impl == "ours":
            loss = logit_lens_ce(hidden, norm, head, labels, CE_SHAPE["chunk"], softcap, "sum", freeze)
        else:
            logits = torch.nn.functional.linear(norm(hidden[0]), head.detach() if freeze else head)
            logits = logits if softcap is None else softcap * torch.tanh(logits / softcap)
            loss = torch.nn.functional.cross_entropy(logits, labels[0], reduction="sum")
        loss.backward()
    return run


def ce_probe(impl: str, softcap_text: str, freeze: bool) -> None:
    """Run in a fresh process: one loss + backward, print the peak memory over the inputs (MiB)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inputs = ce_inputs(device, softcap_text, freeze)
    base = peak_rss_mib()
    ce_step(impl, *inputs, freeze)()
    print(json.dumps({"peak_mib": peak_rss_mib() - base}))


def bench_ce(device, quick):
    rows, buffer_mib = [], CE_SHAPE["chunk"] * CE_SHAPE["vocab"] * 4 / 2**20
    for softcap_text in ("30", "none"):
        for freeze in (True, False):
            inputs = ce_inputs(device, softcap_text, freeze)
            t_ours, t_plain, ratio = paired_ratio(ce_step("ours", *inputs, freeze),
                                                  ce_step("plain", *inputs, freeze), device, 3 if quick else 6)
            peaks = {}
            for impl in ("ours", "plain") if device.type == "cpu" else ():
                proc = subprocess.run([sys.executable, __file__, "--ce-probe", impl, softcap_text, str(freeze)],
                                      capture_output=True, text=True, check=True)
                peaks[impl] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
            label = f"softcap {softcap_text}, head {'frozen (LC, ET)' if freeze else 'trained (TFT)'}"
            mem = (f"{peaks['ours'] / buffer_mib:.1f} / {peaks['plain'] / buffer_mib:.1f}" if peaks else "-")
            rows.append((label, f"{t_ours * 1e3:.0f} / {t_plain * 1e3:.0f}", f"{ratio:.2f}", mem))
            SUMMARY.append(("ce", f"logit_lens_ce / plain autograd CE, {label}",
                            f"time {ratio:.2f}x; peak {mem} [chunk, V] fp32 buffers"))
    table(f"logit_lens_ce (chunk {CE_SHAPE['chunk']}) vs the plain autograd formula (full [rows, V] logits, "
          f"F.cross_entropy), {CE_SHAPE['rows']} rows, D={CE_SHAPE['dim']}, V={CE_SHAPE['vocab']}, fp32; peak: a "
          f"fresh process's RSS over its inputs, in [chunk, V] fp32 buffers of {buffer_mib:.0f} MiB (CPU only)",
          ["case", "ms ours / plain", "time ratio", "peak buffers ours / plain"], rows)


# --- prepare: 52k synthetic parallel examples --------------------------------------------------------------------------

def bench_prepare(quick):
    from model import sample_texts
    from prepare_data import PrepareConfig, prepare

    n = 5_200 if quick else 52_002
    workdir = Path(tempfile.mkdtemp(prefix="dft-prep-"))
    en = json.loads((ROOT / "data/sample/alpaca_en.json").read_text(encoding="utf-8"))
    vi = json.loads((ROOT / "data/sample/alpaca_vi.json").read_text(encoding="utf-8"))
    # Synthetic 52k: the sample's pairs repeated with a numbered suffix, so every example is a distinct text.
    make = lambda rows: [{**rows[k % len(rows)], "instruction": f"{rows[k % len(rows)]['instruction']} ({k})"}  # noqa: E731
                         for k in range(n)]
    (workdir / "en.json").write_text(json.dumps(make(en), ensure_ascii=False), encoding="utf-8")
    (workdir / "vi.json").write_text(json.dumps(make(vi), ensure_ascii=False), encoding="utf-8")
    write_tiny_checkpoint(workdir / "tok", "llama", sample_texts())
    t0 = time.perf_counter()
    prepare(PrepareConfig(lang="vi", en=workdir / "en.json", tgt=workdir / "vi.json", tokenizer=workdir / "tok",
                          out=workdir / "out"))
    seconds = time.perf_counter() - t0
    table("prepare_data.py on synthetic parallel data", ["examples", "cores", "seconds", "goal"],
          [(n, 1, f"{seconds:.1f}", "< 60 s for 52k")])
    SUMMARY.append(("prepare", f"{n} examples", f"{seconds:.1f} s (goal < 60 s for 52k)"))


# --- decode: batched cached greedy decoding vs transformers' generate ---------------------------------------------------

def bench_decode(device, quick):
    import transformers
    from evaluate import greedy_generate
    from model import Tokenizer, sample_texts

    workdir = Path(tempfile.mkdtemp(prefix="dft-dec-"))
    path = write_tiny_checkpoint(workdir / "m", "llama", sample_texts(), dim=256, n_layers=4, n_heads=4,
                                 n_kv_heads=4, head_dim=64, hidden_dim=688)
    ours = Transformer.from_pretrained(path, device=device)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    tok = Tokenizer(path)
    vi = json.loads((ROOT / "data/sample/alpaca_vi.json").read_text(encoding="utf-8"))
    prompts = [tok.encode(r["instruction"]) for r in vi[:16]]
    new = 32 if quick else 64
    # Neither side may stop early (random weights): both decode exactly `new` tokens per prompt.
    tok.eos_id = -1
    ours_fn = lambda: greedy_generate(ours, tok, prompts, max_new_tokens=new, batch_size=16,  # noqa: E731
                                      stop_at_newline=False)

    def ref_fn():
        T = max(map(len, prompts))
        ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.no_grad():
            ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0)

    a, b, r = paired_ratio(ours_fn, ref_fn, device, 3)
    n_tokens = len(prompts) * new
    table("batched greedy decoding with the KV cache (16 prompts, tiny LLaMA 4x256)",
          ["new tokens", "ours tok/s", "transformers generate tok/s", "speed ratio ours/theirs"],
          [(n_tokens, f"{n_tokens / a:.0f}", f"{n_tokens / b:.0f}", f"{1 / r:.2f}")])
    SUMMARY.append(("decode", "tokens/s ours / generate", f"{1 / r:.2f}x (goal >= 1.0)"))


# --- padding: what length grouping saves (train.group_by_length) ------------------------------------------------------

def sample_examples(workdir: Path) -> list[dict]:
    """The 120 examples of the bundled vi sample, prepared with the bench's tokenizer (sample_batch's)."""
    sample_batch(1, workdir)
    data = load_prepared(workdir / "prepared-vi")
    return [data[i] for i in range(len(data))]


def split_plans(lengths: torch.Tensor, world: int, batch_size: int, seed: int = 0):
    """One step's examples in the seed's order, split the old way (each rank a contiguous slice, micro-batches
    cut in order) and by train.group_by_length: -> (old plan, grouped plan), plan[rank][micro] = rows."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    per_rank = -(-len(order) // world)
    old = [[order[r * per_rank:(r + 1) * per_rank][m:m + batch_size] for m in range(0, per_rank, batch_size)]
           for r in range(world)]
    return old, group_by_length(lengths, world, batch_size)


def padded_over_real(lengths: torch.Tensor, plan) -> tuple[float, float]:
    """(padded / real tokens of a step split by `plan`, the slowest rank's padded tokens / the mean rank's)."""
    per_rank = [sum(padded_tokens(lengths[group]) for group in micro if group) for micro in plan]
    return sum(per_rank) / int(lengths.sum()), max(per_rank) / (sum(per_rank) / len(per_rank))


GPU_RUNS = (("tft", "tft", {}), ("dft-logits shared", "dft-logits", {}), ("dft-feature", "dft-feature", {}))


def bench_padding(quick):
    examples = sample_examples(Path(tempfile.mkdtemp(prefix="dft-pad-")))
    rows = []
    for label, mode, overrides in GPU_RUNS + (("dft-logits plain", "dft-logits", {"prefix_share": False}),):
        cfg = DFTConfig(**overrides)
        lc_type, et_type = cfg.types(mode)
        lengths = pass_lengths(examples, lc_type, et_type, cfg.prefix_share)
        for world in (1, 8):
            old, grouped = split_plans(lengths, world, 4)
            (before, _), (after, balance) = padded_over_real(lengths, old), padded_over_real(lengths, grouped)
            rows.append((label, world, f"{before:.3f}", f"{after:.3f}", f"{balance:.3f}"))
            if world == 8:
                SUMMARY.append(("padding", f"{label}, 8 ranks x micro-batch 4",
                                f"padded/real {before:.2f} -> {after:.2f} (goal <= 1.10)"))
    table(f"padded / real tokens of one step of the bundled vi sample ({len(examples)} examples, micro-batch 4): "
          "old contiguous split vs train.group_by_length (exact: the gradient does not depend on the split)",
          ["mode", "ranks", "old split", "grouped", "slowest rank / mean (grouped)"], rows)


# --- gpu: one optimizer step of the paper's models as train.py runs it ----------------------------------------------

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}      # dense bf16 FLOP/s
REAL_SHAPES = {     # the paper's models, as their config.json give them (random weights: only shapes matter)
    "LLaMA-2-7B": dict(family="llama", dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
                       hidden_dim=11008, vocab_size=32000, norm_eps=1e-5),
    "Gemma-2-2B": dict(family="gemma2", dim=2304, n_layers=26, n_heads=8, n_kv_heads=4, head_dim=256,
                       hidden_dim=9216, vocab_size=256000, norm_eps=1e-6, tie_embeddings=True, norm_offset=1.0,
                       mlp_act="gelu_tanh", embed_scale=2304 ** 0.5, sandwich_norm=True,
                       query_scale=256 ** -0.5, attn_softcap=50.0, final_softcap=30.0, sliding_window=4096,
                       sliding_layers=tuple(i % 2 == 0 for i in range(26))),
}
PAPER_RUN = dict(pairs=52_002, epochs=3, global_batch=128, gpus=8)


def real_shape(name: str, quick: bool) -> ModelArgs:
    """The real shape, or (quick, a dry run of the code path on CPU) the same family at width 128, 4 blocks."""
    fields = dict(REAL_SHAPES[name])
    if quick:
        fields.update(dim=128, n_layers=4, n_heads=2, n_kv_heads=2 if fields["family"] == "llama" else 1,
                      hidden_dim=256, vocab_size=4096, embed_scale=None if fields["family"] == "llama" else 128 ** 0.5)
        if fields["family"] == "gemma2":
            fields.update(sliding_layers=(True, False, True, False), sliding_window=64)
    return ModelArgs(**fields)


def gpu_step(args: ModelArgs, device, mode: str, cfg: DFTConfig, micro: list[dict], reps: int) -> dict:
    """Median seconds of one optimizer step over `micro` (one rank's micro-batches) exactly as train.py runs it:
    fp32 master weights under FSDP2 (a world of one), bf16 mixed precision, compiled blocks and fused AdamW on
    CUDA; plus the graphs compiled and the peak memory."""
    from torch._dynamo.utils import counters

    cuda = device.type == "cuda"
    model = build(args, device)
    apply_fsdp(model, bf16=cuda, activation_checkpointing=False, compile=cuda)
    optimizer = make_optimizer(model, TrainConfig(), device)
    graphs_before = counters["stats"]["unique_graphs"]

    def step():
        counts = global_counts(micro, mode, cfg, device)
        forward_backward(model, micro, counts, mode, cfg, device)
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    step()                                  # compiles happen in the first steps (lengths differ per micro-batch)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    del model, optimizer
    return {"sec": statistics.median(times), "peak_gib": peak,
            "graphs": counters["stats"]["unique_graphs"] - graphs_before}


def flex_check(device, args: ModelArgs) -> str:
    """bf16 logits of real tokens: flex_attention against the hand-written reference (2 blocks, padded rows)."""
    model = build(ModelArgs(**{**asdict(args), "n_layers": 2, "sliding_layers": args.sliding_layers[:2]}),
                  device, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, args.vocab_size, (3, 300), generator=g).to(device)
    mask = (torch.arange(300) < torch.tensor([[300], [211], [97]])).long().to(device)
    with torch.no_grad():
        model.use_flex = False
        ref = model(tokens, attention_mask=mask)[mask.bool()].float()
        model.use_flex = True
        got = model(tokens, attention_mask=mask)[mask.bool()].float()
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    return f"flex vs reference, bf16 logits: max rel err {err:.1e} ({'OK' if err < 3e-2 else 'FAIL'})"


def bench_gpu(device, quick):
    """Tokens/s, MFU and memory of one rank's share of a step of the bundled sample at the paper's shapes, and the
    paper's whole run projected from it. On CPU (--quick) this is a dry run of the code path at tiny shapes."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    examples = sample_examples(Path(tempfile.mkdtemp(prefix="dft-gpu-")))
    world, batch_size = PAPER_RUN["gpus"], 4
    if not dist.is_initialized():          # train.py's FSDP2 code path needs a process group: a world of one
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    rows, notes = [], []
    for shape in REAL_SHAPES:
        args = real_shape(shape, quick)
        if device.type == "cuda":
            notes.append(f"{shape}: {flex_check(device, args)}")
        for label, mode, overrides in GPU_RUNS:
            cfg = DFTConfig(**overrides)
            lc_type, et_type = cfg.types(mode)
            lengths = pass_lengths(examples, lc_type, et_type, cfg.prefix_share)
            plan = group_by_length(lengths, world, batch_size)
            busiest = max(range(world), key=lambda r: sum(padded_tokens(lengths[g]) for g in plan[r]))
            micro = [on_device(collate([examples[i] for i in group], 0), device) for group in plan[busiest]]
            real = sum(int(lengths[group].sum()) for group in plan[busiest])
            try:
                r = gpu_step(args, device, mode, replace(cfg, lc_layer=None, et_layer=None), micro,
                             2 if quick else 5)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append((shape, label, "out of memory", "", "", "", "", ""))
                continue
            flops = sum(step_flops(args, batch, mode, cfg) for batch in micro)
            mfu = flops / r["sec"] / peak if peak else float("nan")
            per_example = float(lengths.sum()) / len(examples)       # real tokens an example costs, all passes
            # The sample is one step of len(examples) examples on `world` GPUs, paced by its busiest rank.
            minutes = PAPER_RUN["pairs"] * PAPER_RUN["epochs"] / len(examples) * r["sec"] / 60
            rows.append((shape, label, f"{real / r['sec']:,.0f}", f"{100 * mfu:.1f}%", f"{r['peak_gib']:.1f}",
                         r["graphs"], f"{per_example:.0f}", f"{minutes:.0f}"))
            SUMMARY.append(("gpu", f"{shape} {label}", f"{real / r['sec']:,.0f} real tok/s, MFU {100 * mfu:.1f}%, "
                                                       f"paper run ~{minutes:.0f} min on {world} GPUs"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    how = "bf16 mixed precision, compiled blocks, fused AdamW" if device.type == "cuda" else "fp32, eager"
    table(f"one optimizer step as train.py runs it ({name}; FSDP2 world of one, {how}): the busiest of "
          f"{world} ranks' micro-batches (group_by_length, micro-batch "
          f"{batch_size}) of the bundled vi sample; MFU = FLOP model / time / dense bf16 peak",
          ["model", "mode", "real tokens/s", "MFU", "peak GiB", "graphs compiled", "real tokens / example",
           f"paper run, minutes on {world} GPUs"], rows)
    print(f"\nProjection of the paper's run: {PAPER_RUN['pairs']:,} pairs x {PAPER_RUN['epochs']} epochs on {world} "
          f"GPUs, each optimizer step as long as the timed share (the busiest rank's; group_by_length balances "
          f"ranks to within ~10%) per {len(examples)} examples. Assumes: an H100 runs as fast as the GPU measured "
          f"here (same dense bf16 peak); FSDP2's all-gathers and reduce-scatters hide behind compute on one node's "
          f"NVLink; examples are as long as the bundled sample's under the bench's tokenizer (LLaMA-2's own "
          f"tokenizer spends more tokens on Vietnamese: scale the minutes by your data's real tokens per example).")
    for note in notes:
        print(note)
    if quick and device.type != "cuda":
        print("(--quick on CPU: tiny shapes, a dry run of the code path; the figures mean nothing)")
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default="model,dft,ce,padding,prepare,decode,gpu",
                        help="sections (gpu runs on CUDA, or on CPU as a dry run with --quick)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions")
    parser.add_argument("--memory-probe", nargs=4, metavar=("FAMILY", "RUN", "WORKDIR", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--ce-probe", nargs=3, metavar=("IMPL", "SOFTCAP", "FREEZE"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.ce_probe:
        return ce_probe(a.ce_probe[0], a.ce_probe[1], a.ce_probe[2] == "True")
    if a.memory_probe:
        family, mode, workdir, batch_size = a.memory_probe
        return memory_probe(family, mode, Path(workdir), int(batch_size))
    device = torch.device(a.device)
    sections = set(a.only.split(","))
    print(f"torch {torch.__version__}, device {device}" + (f" ({torch.cuda.get_device_name(device)})"
                                                           if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    if "model" in sections:
        bench_model(device, a.quick)
    if "dft" in sections:
        bench_dft(device, a.quick)
    if "ce" in sections:
        bench_ce(device, a.quick)
    if "prepare" in sections and device.type == "cpu":
        bench_prepare(a.quick)
    if "decode" in sections:
        bench_decode(device, a.quick)
    if "padding" in sections:
        bench_padding(a.quick)
    if "gpu" in sections and (device.type == "cuda" or a.quick):
        bench_gpu(device, a.quick)
    table("summary", ["section", "figure", "value"], SUMMARY)


if __name__ == "__main__":
    main()
