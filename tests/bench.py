"""The project's one benchmark: every speed and memory figure, measured side by side in one run, as ratios.

    python tests/bench.py                      # CPU, a few minutes
    python tests/bench.py --device cuda        # adds tokens/s and MFU at Gemma-2-2B / LLaMA-2-7B shapes
    python tests/bench.py --only model,dft     # sections: model, dft, prepare, decode, gpu

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
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from model import DFTConfig, ModelArgs, Transformer, count_targets, write_tiny_checkpoint  # noqa: E402

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
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


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


# --- gpu: tokens/s and MFU at real shapes --------------------------------------------------------------------------------

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def train_step_rate(args: ModelArgs, device, mode: str, B: int, T: int, reps: int) -> dict:
    """Median seconds of a full optimizer step (bf16 weights and AdamW) on random tokens: the prompt is the first half
    of each row, the response the second; for dft-logits the English halves are the same tokens (shapes are what
    matter here)."""
    model = build(args, device, torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(3, args.vocab_size, (B, T), generator=g).to(device)
    half = T // 2
    labels = torch.full_like(toks, -100)
    labels[:, half - 1:-1] = toks[:, half:]
    ones = torch.ones_like(toks)
    batch = {"tft_tokens": toks, "tft_labels": labels, "tft_mask": ones, "tgt_prompt_len": torch.full((B,), half, device=device),
             "lc_tokens": toks, "lc_labels": labels, "lc_mask": ones, "lc_content": (labels != -100).long(),
             "et_tokens": toks, "et_labels": labels, "et_mask": ones}
    ref_i, ref_j = (2, 15) if args.family == "llama" else (2, 12)
    cfg = DFTConfig(lc_layer=min(ref_i, args.n_layers), et_layer=min(ref_j, args.n_layers))
    counts = count_targets(batch, mode, cfg)

    def step():
        opt.zero_grad(set_to_none=True)
        model.dft_step(batch, mode, cfg, counts)["loss"].backward()
        opt.step()

    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    n_params = sum(p.numel() for p in model.parameters())
    del model, opt
    return {"sec": sec, "flops": step_flops(args, batch, mode, cfg), "peak_gib": peak, "n_params": n_params}


def bench_gpu(device, quick):
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    rows = []
    B, T = 4, 512
    for family, dim, n_layers, vocab in (("gemma2", 2304, 26, 256000), ("llama", 4096, 32, 32000)):
        args = reduced_config(family, n_layers, dim, vocab)
        args.hidden_dim = 9216 if family == "gemma2" else 11008
        for mode in ("tft", "dft-logits"):
            for layers in (n_layers, n_layers // 2):           # fewer blocks if the whole model does not fit
                args.n_layers = layers
                args.sliding_layers = tuple(i % 2 == 0 for i in range(layers)) if family == "gemma2" else ()
                try:
                    r = train_step_rate(args, device, mode, B, T, 3 if quick else 6)
                    break
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
            mfu = r["flops"] / r["sec"] / peak if peak else float("nan")
            rows.append((f"{family} {layers}/{n_layers} blocks, {r['n_params'] / 1e9:.2f}B params", mode,
                         f"{B * T / r['sec']:.0f}", f"{100 * mfu:.1f}%", f"{r['peak_gib']:.1f}"))
            SUMMARY.append(("gpu", f"{family} {mode}", f"{B * T / r['sec']:.0f} tok/s, MFU {100 * mfu:.1f}%"))
            torch.cuda.empty_cache()
    table(f"GPU training step, bf16 weights + AdamW, B={B}, T={T} ({name}); MFU = FLOP model / time / bf16 peak",
          ["model", "mode", "tokens/s", "MFU", "peak GiB"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default="model,dft,prepare,decode,gpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions")
    parser.add_argument("--memory-probe", nargs=4, metavar=("FAMILY", "RUN", "WORKDIR", "BATCH"), help=argparse.SUPPRESS)
    a = parser.parse_args()
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
    if "prepare" in sections and device.type == "cpu":
        bench_prepare(a.quick)
    if "decode" in sections:
        bench_decode(device, a.quick)
    if "gpu" in sections and device.type == "cuda":
        bench_gpu(device, a.quick)
    table("summary", ["section", "figure", "value"], SUMMARY)


if __name__ == "__main__":
    main()
