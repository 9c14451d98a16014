"""Fine-tune LLaMA-2 / Gemma-2 with SFT, TFT, DFT-logits or DFT-feature on torchrun + FSDP2.

    torchrun --standalone --nproc_per_node 1 train.py --lang vi        # 1 GPU
    torchrun --standalone --nproc_per_node 8 train.py --lang vi        # 8 GPUs: the paper's setup
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-id dft-vi \\
        --rdzv-endpoint node0.example:29500 train.py --lang vi         # 2 nodes x 8 GPUs: on each
    torchrun --standalone --nproc_per_node 2 train.py --lang vi --model models/tiny-llama \\
        --data data/prepared/tiny-vi --global-batch 8 --batch-size 2   # 2 CPU processes (gloo)
    python train.py --lang vi ...                                      # one process, no torchrun

Under --out (with several nodes, on a filesystem every node sees):
    config.json     the resolved configuration (flags + what was derived from them)
    metrics.jsonl   one row per optimizer step: step, epoch, loss, tft, lc, et, lr, grad_norm,
                    tokens (real tokens of all passes), padded_tokens (rows x padded length, all
                    passes), tokens_per_s; + peak_mem_gib on GPU; + val_* every --eval-every
    ckpt/step_N/    sharded model + optimizer, state.json (step, data position, schedule, data
                    identity); complete or absent; the last --keep-last kept (rerun to resume)
    final/          the model, Hugging Face layout, with --model's tokenizer and generation files

SIGTERM / SIGINT (Ctrl-C): the step is finished, a checkpoint saved, the run exits; a second Ctrl-C
stops at once. Exit status: 0 done or stopped by a signal, 2 a one-line refusal (bad input, a
non-finite loss), 1 a crash.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from tqdm import tqdm

from model import (LOSS_TYPES, MODES, CheckpointError, DFTConfig, Tokenizer, Transformer,
                   check_checkpoint, count_targets, load_weights, read_args, replace_dir,
                   resolve_dtype, write_atomic)
from prepare_data import check_meta, collate, data_identity, load_prepared, prepare_command

# Files of --model copied as they are next to the exported weights.
SIDE_FILES = ("config.json", "tokenizer.model", "tokenizer.json", "vocab.json", "merges.txt",
              "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "generation_config.json")
# Flags a rerun may change and still resume: they change neither the data order nor an optimizer
# step's mathematics (the micro-batch size only regroups the step's examples; the rest is speed).
RESUMABLE_CHANGES = {"max_steps", "save_every", "keep_last", "eval_every", "batch_size",
                     "activation_checkpointing", "compile", "world_size", "grad_accum",
                     "dft.chunk_size", "dft.prefix_share"}
LOSS_PARTS = ("loss", "tft", "lc", "et")
EXIT_ONE_LINE = 2  # the exit status of a one-line refusal or stop; a crash exits with 1
# Seconds the other ranks leave rank 0 to print a refusal they all reached (torchrun then ends
# them); a rank still alive after that prints the line itself: an error of its own is never lost.
RANK_0_GRACE_S = 10


@dataclass
class TrainConfig:
    lang: str | None = None
    model: str = "models/Llama-2-7b-hf"
    data: str | None = None            # None -> data/prepared/{lang}; data/prepared/sft-en for sft
    out: str | None = None             # None -> runs/{model name}-{mode}-{lang}
    mode: str = "dft-logits"
    epochs: int = 3
    lr: float = 2e-5
    global_batch: int = 128
    batch_size: int = 4                # per process and micro-batch
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int | None = None
    dft: DFTConfig = field(default_factory=DFTConfig)   # flags named as its fields: --lc-layer ...
    seed: int = 42
    save_every: int = 200
    keep_last: int = 2
    val_size: int = 0
    eval_every: int = 100
    activation_checkpointing: bool = False
    compile: bool | None = None        # None -> on with CUDA, off on CPU
    dtype: str = "auto"
    # Derived by resolve_config:
    world_size: int = 1
    grad_accum: int = 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse's errors as one line (its default adds the usage block), raised like every other
    refusal so that under torchrun only rank 0 prints it (see exit_with_one_line)."""

    def error(self, message):
        raise SystemExit(f"{self.prog}: {message}; python {self.prog} --help lists the options")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default; where one is None, the option's text says what is used."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None) -> TrainConfig:
    p = ArgumentParser(prog="train.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--lang", help="the data's language (vi, zh, ar...); required unless --mode sft")
    p.add_argument("--model", help="HF checkpoint dir to start from")
    p.add_argument("--data", help="prepared data dir (default: data/prepared/LANG; "
                                  "data/prepared/sft-en for --mode sft)")
    p.add_argument("--out", help="run dir (default: runs/MODEL-MODE-LANG); rerun with it to resume")
    p.add_argument("--mode", choices=MODES, help="sft: English data only; tft: target-language "
                   "data only; dft-logits / dft-feature: TFT + the LC and ET losses below")
    g = p.add_argument_group("optimisation (defaults: the paper's recipe)")
    g.add_argument("--epochs", type=int, help="passes over the training data")
    g.add_argument("--lr", type=float, help="peak learning rate, then cosine decay to 0")
    g.add_argument("--global-batch", type=int, help="examples per optimizer step, all processes")
    g.add_argument("--batch-size", type=int, help="examples per process and micro-batch; "
                   "accumulation = global / (batch x processes)")
    g.add_argument("--warmup-ratio", type=float, help="linear warmup over this share of the steps")
    g.add_argument("--weight-decay", type=float, help="AdamW decay of the matrices (norms never)")
    g.add_argument("--max-grad-norm", type=float, help="clip the global gradient norm to this")
    g.add_argument("--max-steps", type=int, help="stop after N steps (default: all); the schedule "
                   "still spans --epochs, so a later run without it continues")
    d = p.add_argument_group("deep supervision", """\
L = L_TFT + w_LC L_LC + w_ET L_ET. LC (language conversion): at an early layer i, the query in the
target language should already predict its English version. ET (English thinking): at a middle
layer j, it should already predict the English answer. logits: through the frozen final norm and
head; feature: cosine to the hidden states of the English query. The paper gives the formulas, the
unweighted sum and LLaMA-2's j = 15; the README lists the other choices, which are ours.""")
    d.add_argument("--lc-layer", type=int, help="layer i (default: 2 for LLaMA-2's 32 blocks and "
                   "Gemma-2's 26; scaled for other depths)")
    d.add_argument("--et-layer", type=int, help="layer j (default: 15 of LLaMA-2's 32 blocks, 12 "
                   "of Gemma-2's 26; scaled for other depths)")
    d.add_argument("--lc-weight", type=float, help="w_LC; 0 skips the LC pass")
    d.add_argument("--et-weight", type=float, help="w_ET; 0 skips the ET pass")
    d.add_argument("--lc-type", choices=LOSS_TYPES, help="LC loss type (default: the mode's)")
    d.add_argument("--et-type", choices=LOSS_TYPES, help="ET loss type (default: the mode's)")
    d.add_argument("--lc-content-only", action=argparse.BooleanOptionalAction,
                   help="LC predicts only x_en's instruction+input, not the English template words")
    d.add_argument("--pooling", choices=("mean", "last"),
                   help="feature losses: pool the query's content tokens by")
    d.add_argument("--detach-teacher", action=argparse.BooleanOptionalAction,
                   help="feature losses: no gradient through the English side")
    d.add_argument("--teacher-norm", action=argparse.BooleanOptionalAction,
                   help="feature ET: the teacher h_N(x_en) after the final norm")
    d.add_argument("--chunk-size", type=int, help="tokens per chunk of the cross-entropy")
    d.add_argument("--prefix-share", action=argparse.BooleanOptionalAction, help="logits LC/ET: "
                   "only the English part runs, on the TFT pass's keys/values (same numbers)")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, help="data order and validation split")
    r.add_argument("--save-every", type=int, help="checkpoint every N steps (and at the end)")
    r.add_argument("--keep-last", type=int, help="checkpoints kept")
    r.add_argument("--val-size", type=int, help="examples held out for validation")
    r.add_argument("--eval-every", type=int,
                   help="validate every N steps and at the end; needs --val-size")
    r.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in backward: activations of one block instead of all")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile each "
                   "block (default: on with CUDA; off on CPU, where it costs more than it saves)")
    r.add_argument("--dtype", choices=("auto", "bf16", "fp32"), help="auto: bf16 mixed precision "
                   "on CUDA, fp32 on CPU (where bf16 matmuls are ~100x slower)")
    # Defaults: the dataclasses' own, so each lives in one place (the flags are their field names).
    defaults = asdict(TrainConfig())
    dft_defaults = defaults.pop("dft")
    p.set_defaults(**defaults, **dft_defaults)
    values = vars(p.parse_args(argv))
    dft = DFTConfig(**{name: values.pop(name) for name in dft_defaults})
    return TrainConfig(**values, dft=dft)


# --- Pure helpers ---------------------------------------------------------------------------------

def get_lr(step: int, total_steps: int, warmup_steps: int, max_lr: float) -> float:
    """Linear warmup over the first warmup_steps steps (0-based `step`: the first one already
    gets max_lr / warmup_steps), then cosine decay from max_lr to 0 at total_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return 0.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def pass_lengths(examples: list[dict], lc_type: str, et_type: str,
                 prefix_share: bool) -> torch.Tensor:
    """Tokens each forward pass of model.dft_step runs for each example: [n, passes]. TFT runs
    [x_tgt ; y_tgt]; a logits LC/ET pass its whole sequence, or with prefix sharing only the English
    rest after x_tgt (on the TFT pass's keys/values); the feature losses the English query."""
    shared = prefix_share and "logits" in (lc_type, et_type)
    passes = [[len(e["tft_tokens"]) for e in examples]]
    for kind, loss_type in (("lc", lc_type), ("et", et_type)):
        if loss_type == "logits":
            passes.append([len(e[f"{kind}_tokens"]) - (e["tgt_prompt_len"] if shared else 0)
                           for e in examples])
    if "feature" in (lc_type, et_type):
        passes.append([len(e["en_tokens"]) for e in examples])
    return torch.tensor(passes, dtype=torch.long).T


def padded_tokens(lengths: torch.Tensor) -> int:
    """Tokens a micro-batch with these pass_lengths computes: each pass pads to its longest row."""
    if not len(lengths):
        return 0
    return len(lengths) * int(lengths.max(0).values.clamp(min=1).sum())


def group_by_length(lengths: torch.Tensor, world: int, batch_size: int) -> list[list[list[int]]]:
    """Split one step's examples (rows of `lengths`, their pass_lengths) into `world` ranks x the
    same number of micro-batches (FSDP's collectives need as many forward/backward calls on every
    rank) of at most batch_size examples -> plan[rank][micro-batch] = row indices, ascending; each
    row used once. Any split gives the same gradient (each loss part is a sum over the step's
    global count): this one only saves padding. Sorting by one length would not do, since a step
    runs up to three passes whose lengths differ (prompt vs answer, target language vs English):
    each micro-batch opens with the longest example left and takes, one by one, the example that
    adds the least padding over all passes (the growth of its padded lengths, paid by every row,
    minus the real tokens it brings). The micro-batches then go, costliest first, to the rank with
    the fewest padded tokens so far that still has room."""
    n = len(lengths)
    per_rank = max(1, math.ceil(n / (world * batch_size)))
    n_micro = world * per_rank
    # Equal sizes when n fills every micro-batch (training); a validation set may not.
    sizes = [n // n_micro + (m < n % n_micro) for m in range(n_micro)]
    totals = lengths.sum(1)
    left = torch.ones(n, dtype=torch.bool)
    micro_batches = []
    for size in sizes:
        group = []
        if size:
            first = int(torch.where(left, totals, -1).argmax())     # argmax/argmin: first of equals
            group = [first]
            longest = lengths[first]
            left[first] = False
        while len(group) < size:
            waste = size * (torch.maximum(longest, lengths) - longest).sum(1) - totals
            pick = int(torch.where(left, waste, torch.iinfo(waste.dtype).max).argmin())
            group.append(pick)
            longest = torch.maximum(longest, lengths[pick])
            left[pick] = False
        micro_batches.append(sorted(group))
    cost = [padded_tokens(lengths[group]) for group in micro_batches]
    plan = [[] for _ in range(world)]
    load = [0] * world
    for m in sorted(range(n_micro), key=lambda m: -cost[m]):     # stable: ties keep their order
        rank = min((r for r in range(world) if len(plan[r]) < per_rank), key=lambda r: load[r])
        plan[rank].append(micro_batches[m])
        load[rank] += cost[m]
    return plan


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"dft": {"chunk_size": 1024}} -> {"dft.chunk_size": 1024}."""
    items = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            items |= flatten(value, f"{prefix}{key}.")
        else:
            items[prefix + key] = value
    return items


def flag(field_name: str) -> str:
    """The flag that sets a config field: lc_weight or dft.lc_weight -> --lc-weight."""
    return "--" + field_name.split(".")[-1].replace("_", "-")


def describe_meta_change(old: dict | None, new: dict) -> str:
    """What differs between two meta.json dicts, e.g. "max_len 512 -> 256, num_examples 113 ->
    120": top-level fields (the flags prepare_data.py ran with) before the counts they led to."""
    if old is None:
        return "the checkpoint records no data identity"
    old_items = flatten(old)
    new_items = flatten(new)
    keys = sorted(old_items | new_items, key=lambda key: (key.count("."), key))
    changed = [f"{key} {old_items.get(key)} -> {new_items.get(key)}"
               for key in keys if old_items.get(key) != new_items.get(key)]
    if not changed:
        return "same meta.json, other array sizes"
    more = f", ... {len(changed) - 4} more" if len(changed) > 4 else ""
    return ", ".join(changed[:4]) + more


# --- Checking the inputs (before any work) and resolving the defaults -----------------------------

def resolve_config(cfg: TrainConfig, world_size: int, device_type: str) -> TrainConfig:
    """The defaults that depend on other flags and on the device; one line per impossible value."""
    if cfg.mode != "sft" and not cfg.lang:
        raise SystemExit(f"--mode {cfg.mode} needs --lang (the data's language, e.g. --lang vi)")
    lang = cfg.lang or "en"                   # --mode sft needs none: its data is English
    # Where prepare_data.py writes by default (its --out):
    data = cfg.data or ("data/prepared/sft-en" if cfg.mode == "sft" else f"data/prepared/{lang}")
    out = cfg.out or f"runs/{Path(cfg.model).name}-{cfg.mode}-{lang if cfg.mode != 'sft' else 'en'}"
    max_steps = cfg.max_steps if cfg.max_steps is not None else 1
    positive = {"--epochs": cfg.epochs, "--global-batch": cfg.global_batch,
                "--batch-size": cfg.batch_size, "--save-every": cfg.save_every,
                "--keep-last": cfg.keep_last, "--eval-every": cfg.eval_every,
                "--chunk-size": cfg.dft.chunk_size, "--max-steps": max_steps, "--lr": cfg.lr,
                "--max-grad-norm": cfg.max_grad_norm}
    for name, value in positive.items():
        if value <= 0:
            raise SystemExit(f"{name} {value}: expected a number > 0")
    for name, value in {"--val-size": cfg.val_size, "--weight-decay": cfg.weight_decay}.items():
        if value < 0:
            raise SystemExit(f"{name} {value}: expected a number >= 0")
    if not 0 <= cfg.warmup_ratio < 1:
        raise SystemExit(f"--warmup-ratio {cfg.warmup_ratio}: expected a fraction in [0, 1)")
    per_step = cfg.batch_size * world_size
    if cfg.global_batch % per_step:
        suggestion = max(1, round(cfg.global_batch / per_step)) * per_step
        raise SystemExit(f"--global-batch {cfg.global_batch} is not a multiple of --batch-size "
                         f"{cfg.batch_size} x {world_size} process(es) = {per_step}; choose e.g. "
                         f"--global-batch {suggestion} or another --batch-size")
    dtype = resolve_dtype(cfg.dtype, device_type)
    compile = cfg.compile if cfg.compile is not None else device_type == "cuda"
    return replace(cfg, lang=lang, data=data, out=out, dtype=dtype, compile=compile,
                   world_size=world_size, grad_accum=cfg.global_batch // per_step)


def check_inputs(cfg: TrainConfig):
    """Model, tokenizer, layers and data checked from their small files, then --out made, before any
    process group or allocation -> (model args, tokenizer, dataset, cfg.dft with its layers)."""
    model_dir = Path(cfg.model)
    try:
        args = read_args(model_dir)             # a missing config.json: the line names the download
        tokenizer = Tokenizer(model_dir)
        with torch.device("meta"):
            check_checkpoint(model_dir, Transformer(args))     # safetensors headers only
    except CheckpointError as e:
        raise SystemExit(str(e)) from None

    try:
        cfg.dft.types(cfg.mode)
        lc_layer, et_layer = cfg.dft.layers(args)
    except ValueError as e:
        # DFTConfig's messages name its fields (lc_layer=5); the user set flags (--lc-layer 5).
        message = str(e)
        for f in fields(DFTConfig):
            message = message.replace(f"{f.name}=", f"{flag(f.name)} ")
        raise SystemExit(f"{message} (--model {model_dir}, --mode {cfg.mode})") from None
    dft = replace(cfg.dft, lc_layer=lc_layer, et_layer=et_layer)

    data_dir = Path(cfg.data)
    data_mode = "sft" if cfg.mode == "sft" else "parallel"
    dataset = load_prepared(data_dir, prepare_command(data_mode, cfg.lang, cfg.model, data_dir))
    check_meta(dataset.meta, cfg.lang, data_mode, tokenizer.sha256, data_dir)
    train_size = len(dataset) - cfg.val_size
    if train_size < cfg.global_batch:
        raise SystemExit(f"{data_dir}: {train_size} examples left after --val-size {cfg.val_size}, "
                         f"fewer than --global-batch {cfg.global_batch}")

    # --out last: a refused run leaves no new directory. Made by every rank: each node must see it.
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {out}: {e.strerror}; choose a path where you can write") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise SystemExit(f"--out {out}: not writable; choose a path where you can write")
    return args, tokenizer, dataset, dft


def read_resume_state(ckpt: Path, cfg: TrainConfig, data: dict) -> dict:
    """The checkpoint's state.json, refused in one line when written by a run with other flags or
    on other data (`data`: this run's data identity and meta.json, as states record them)."""
    state = json.loads((ckpt / "state.json").read_text())
    saved = flatten(state["config"])
    now = flatten(asdict(cfg))
    differ = [k for k in sorted(saved.keys() | now.keys())
              if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)]
    if differ:
        shown = ", ".join(f"{flag(k)} {saved.get(k)} (now {now.get(k)})" for k in differ)
        raise SystemExit(f"{ckpt}: written by a run with {shown}; rerun with those flags to "
                         f"resume, or pick another --out")
    saved_data = state.get("data") or {}
    if saved_data.get("identity") != data["identity"]:
        change = describe_meta_change(saved_data.get("meta"), data["meta"])
        raise SystemExit(f"{ckpt}: {cfg.data} changed since this checkpoint ({change}); to train "
                         f"on it, start afresh with another --out (or remove {cfg.out})")
    return state


# --- Distributed setup ----------------------------------------------------------------------------

def init_distributed(device: torch.device) -> tuple[int, int]:
    """NCCL on GPU, gloo on CPU. Under torchrun the env says who we are; alone we are a world of
    one, so the same FSDP2 and checkpoint code runs either way."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def apply_fsdp(model: Transformer, bf16: bool, activation_checkpointing: bool,
               compile: bool) -> None:
    """torchtitan's order: activation checkpointing -> compile -> fully_shard per block, then the
    root (embedding, final norm and head). Parameters stay fp32 and sharded; under bf16 each block
    computes in bf16 and gradients are reduced in fp32 (AdamW at 2e-5 on bf16-stored weights would
    round most updates away)."""
    # fp32: the RoPE tables (cos, sin) each block receives. FSDP would cast every floating input of
    # a block to param_dtype; the hidden states need no cast (the bf16 embedding makes them bf16).
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                              cast_forward_inputs=False) if bf16 else MixedPrecisionPolicy()
    for block in model.layers:
        if activation_checkpointing:
            # Recompute the block in backward. Its forward is wrapped in place, not in a wrapper
            # module, so the parameter names stay those of the HF key table in model.py.
            block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward,
                                              use_reentrant=False)
        if compile:
            # In place too. dynamic=True: the sequence length is symbolic from the first call, so a
            # new length reuses the graph (torch would recompile until automatic dynamic kicks in).
            block.compile(dynamic=True)
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # dft_step uses the root's parameters outside forward: FSDP must unshard them for it too.
    register_fsdp_forward_method(model, "dft_step")


def make_optimizer(model: Transformer, cfg: TrainConfig,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW, decay on the matrices only; fused on CUDA (one kernel launch for all parameters)."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                             fused=True if device.type == "cuda" else None)


# --- Files: checkpoints, export, metrics ----------------------------------------------------------

def row_step(line: str) -> int | None:
    """The step of a metrics.jsonl row; None for a half-written one (a killed run's last row)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """The complete checkpoints, oldest first: step_N dirs with a state.json (not step_N.tmp)."""
    done = [d for d in ckpt_dir.glob("step_*")
            if d.name[5:].isdigit() and (d / "state.json").is_file()]
    return sorted(done, key=lambda d: int(d.name[5:]))


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, state: dict,
                    keep_last: int) -> None:
    """DCP shards of model + optimizer from every rank, then state.json; written under step_N.tmp
    and renamed to step_N when complete, so a kill at any moment leaves either the whole
    checkpoint or an ignored .tmp."""
    rank = dist.get_rank()
    final = ckpt_dir / f"step_{step}"
    tmp = ckpt_dir / f"step_{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    if rank == 0:
        write_atomic(tmp / "state.json", json.dumps(state, indent=1))
        replace_dir(tmp, final)
        for old in checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_checkpoint(ckpt: Path, model, optimizer) -> None:
    """Load the sharded model and optimizer from a checkpoint (resharded if the world changed)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(ckpt))   # in place
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def export(model: Transformer, model_dir: Path, out: Path) -> Path:
    """OUT/final in the HF layout (every rank gathers each tensor in turn, rank 0 writes shard by
    shard) with the SIDE_FILES of --model; staged, then renamed into place."""
    final = out / "final"
    staging = out / "final.partial"
    model.save_pretrained(staging)
    if dist.get_rank() == 0:
        for name in SIDE_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, staging / name)
        replace_dir(staging, final)
    dist.barrier()
    return final


# --- One step: micro-batches forward and backward, validation -------------------------------------

def global_counts(micro: list[dict], mode: str, dft: DFTConfig, device) -> dict:
    """Targets of each loss part in these micro-batches on all ranks, known before any backward:
    what model.dft_step divides each micro-batch's sums by, so they add up to the global mean."""
    counts = torch.zeros(3, dtype=torch.long, device=device)
    for batch in micro:
        counts += torch.tensor(list(count_targets(batch, mode, dft).values()), device=device)
    dist.all_reduce(counts)
    return dict(zip(("tft", "lc", "et"), counts.tolist()))


def on_device(batch: dict, device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def forward_backward(model, micro: list[dict], counts: dict, mode: str, dft: DFTConfig,
                     device) -> torch.Tensor:
    """This rank's micro-batches, forward and backward (gradients add up) -> sums of LOSS_PARTS."""
    sums = torch.zeros(len(LOSS_PARTS), device=device)
    for batch in micro:
        parts = model.dft_step(on_device(batch, device), mode, dft, counts)
        # FSDP2 averages gradients over ranks, but the ranks' losses are shares that must add up.
        (parts["loss"] * dist.get_world_size()).backward()
        sums += torch.stack([parts[k].float().detach() for k in LOSS_PARTS])
    return sums


@torch.no_grad()
def evaluate(model, examples: list[dict], plan: list, mode: str, dft: DFTConfig, pad_id: int,
             device) -> dict:
    """Loss parts over the held-out examples, split by `plan` (group_by_length's), each normalised
    by its count over the whole validation set."""
    micro = [collate([examples[i] for i in group], pad_id) for group in plan[dist.get_rank()]
             if group]
    counts = global_counts(micro, mode, dft, device)
    sums = torch.zeros(len(LOSS_PARTS), device=device)
    for batch in micro:
        parts = model.dft_step(on_device(batch, device), mode, dft, counts)
        sums += torch.stack([parts[k].float() for k in LOSS_PARTS])
    # FSDP all-gathers inside every forward: a rank left without examples runs one anyway, unused.
    for _ in range(len(plan[0]) - len(micro)):
        model.dft_step(on_device(collate(examples[:1], pad_id), device), mode, dft, counts)
    dist.all_reduce(sums)
    return dict(zip(["val_" + part for part in LOSS_PARTS], sums.tolist()))


# --- The run --------------------------------------------------------------------------------------

def non_finite_stop(step: int, what: str, ckpt_dir: Path) -> SystemExit:
    """The one-line stop for a loss or gradient norm that is not finite."""
    done = checkpoints(ckpt_dir)
    saved = f"the newest checkpoint is {done[-1]}" if done else "no checkpoint was written yet"
    return SystemExit(f"step {step}: {what}; stopping ({saved}); try a lower --lr")


def exit_with_one_line(stop: SystemExit) -> None:
    """Print a one-line refusal once (every rank checks the same inputs or all-reduced numbers:
    rank 0 speaks for all) and exit with EXIT_ONE_LINE. A SystemExit, unlike an exception, leaves
    no traceback of ours and no error file (torchrun still reports the worker)."""
    if not isinstance(stop.code, str):
        raise stop
    if os.environ.get("RANK", "0") != "0":
        time.sleep(RANK_0_GRACE_S)
    print(stop.code, file=sys.stderr)
    sys.exit(EXIT_ONE_LINE)


@record
def main(argv=None):
    # Inputs first (flags, model, data, checkpoint): a mistake is refused before any work.
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
              if torch.cuda.is_available() else torch.device("cpu"))
    cfg = resolve_config(parse_args(argv), int(os.environ.get("WORLD_SIZE", "1")), device.type)
    args, tokenizer, dataset, dft = check_inputs(cfg)
    cfg = replace(cfg, dft=dft)
    out = Path(cfg.out)
    ckpt_dir = out / "ckpt"
    model_dir = Path(cfg.model)
    done = checkpoints(ckpt_dir)
    resume_from = done[-1] if done else None
    data = {"identity": data_identity(cfg.data), "meta": dataset.meta}
    resume = read_resume_state(resume_from, cfg, data) if resume_from else None
    lc_type, et_type = dft.types(cfg.mode)

    bf16 = cfg.dtype == "bf16"
    rank, world = init_distributed(device)
    previous_handlers = {}
    try:
        # No global RNG: nothing in a step draws random numbers (no dropout; the data order has its
        # own generators), so a resumed run repeats the uninterrupted one without any RNG state.
        is_main = rank == 0

        # --- data: a held-out validation set, then one permutation of the rest per epoch -------
        split = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))
        val_examples = [dataset[i] for i in sorted(split[:cfg.val_size].tolist())]
        train_indices = split[cfg.val_size:].sort().values
        steps_per_epoch = len(train_indices) // cfg.global_batch    # the last partial one dropped
        total_steps = cfg.epochs * steps_per_epoch
        warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
        last_step = min(total_steps, cfg.max_steps or total_steps)
        schedule = {"kind": "linear warmup + cosine to 0", "total_steps": total_steps,
                    "warmup_steps": warmup_steps, "max_lr": cfg.lr}
        pad_id = tokenizer.pad_id
        val_plan = group_by_length(pass_lengths(val_examples, lc_type, et_type, dft.prefix_share),
                                   world, cfg.batch_size)
        if is_main:
            resolved = asdict(cfg) | dict(device=device.type, bf16=bf16, lc_type=lc_type,
                                          et_type=et_type, steps_per_epoch=steps_per_epoch,
                                          total_steps=total_steps, warmup_steps=warmup_steps,
                                          train_examples=len(train_indices))
            write_atomic(out / "config.json", json.dumps(resolved, indent=2) + "\n")
            print(f"train.py: {cfg.mode} {cfg.lang} | {cfg.model} ({args.n_layers} blocks; LC "
                  f"layer {dft.lc_layer} {lc_type}, ET layer {dft.et_layer} {et_type}) | "
                  f"{len(train_indices)} examples, {cfg.val_size} held out | {steps_per_epoch} "
                  f"steps/epoch x {cfg.epochs} = {total_steps} steps | {world} x "
                  f"{cfg.batch_size} x accumulation {cfg.grad_accum} = {cfg.global_batch} | "
                  f"{'bf16 mixed' if bf16 else 'fp32'} on {device.type} | {out}", file=sys.stderr)

        # --- model: meta -> FSDP2 -> real (sharded) memory -> weights --------------------------
        with torch.device("meta"):
            model = Transformer(args)
        apply_fsdp(model, bf16, cfg.activation_checkpointing, cfg.compile)
        model.to_empty(device=device)
        if resume is None:
            load_weights(model, model_dir)
        optimizer = make_optimizer(model, cfg, device)

        # --- resume --------------------------------------------------------------------------
        step = resume["step"] if resume else 0
        metrics_file = out / "metrics.jsonl"
        if resume is not None:
            load_checkpoint(resume_from, model, optimizer)
            if is_main:
                print(f"train.py: resumed from {resume_from} (step {step})", file=sys.stderr)
        if is_main:
            for unfinished in ckpt_dir.glob("step_*.tmp"):     # a killed run's writes
                shutil.rmtree(unfinished, ignore_errors=True)
            # Steps after the checkpoint are redone: drop their rows (a killed run may have logged
            # them before their checkpoint was saved, the last one maybe half-written).
            rows = metrics_file.read_text().splitlines() if metrics_file.exists() else []
            kept = [row for row in rows if row_step(row) is not None and row_step(row) <= step]
            write_atomic(metrics_file, "".join(row + "\n" for row in kept))

        # --- SIGTERM / SIGINT: finish the step, save, exit -------------------------------------
        stop_requested = []

        def on_signal(signum, frame):
            if stop_requested:             # a second Ctrl-C: stop now
                signal.signal(signum, signal.SIG_DFL)
                raise KeyboardInterrupt
            stop_requested.append(signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            previous_handlers[signum] = signal.signal(signum, on_signal)

        # --- the loop --------------------------------------------------------------------------
        stopped = False
        # Closed on every path: a bar left open would print itself after an error message.
        with tqdm(total=last_step, initial=step, desc=f"{cfg.mode} {cfg.lang}", unit="step",
                  disable=not is_main, dynamic_ncols=True) as bar:
            while step < last_step and not stopped:
                started = time.perf_counter()
                # This epoch's permutation (the same on every rank) and the step's global_batch.
                epoch, step_in_epoch = divmod(step, steps_per_epoch)
                shuffle = torch.Generator().manual_seed(cfg.seed + 1 + epoch)
                order = train_indices[torch.randperm(len(train_indices), generator=shuffle)]
                first = step_in_epoch * cfg.global_batch
                examples = [dataset[i] for i in order[first:first + cfg.global_batch].tolist()]
                lengths = pass_lengths(examples, lc_type, et_type, dft.prefix_share)
                plan = group_by_length(lengths, world, cfg.batch_size)
                micro = [collate([examples[i] for i in group], pad_id) for group in plan[rank]]
                counts = global_counts(micro, cfg.mode, dft, device)
                lr = get_lr(step, total_steps, warmup_steps, cfg.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                sums = forward_backward(model, micro, counts, cfg.mode, dft, device)
                # One all-reduce for the loss sums and whether any rank got a signal.
                stats = torch.cat([sums, sums.new_tensor([len(stop_requested)])])
                dist.all_reduce(stats)
                parts = dict(zip(LOSS_PARTS, stats[:-1].tolist()))
                stopped = stats[-1].item() > 0
                if not math.isfinite(parts["loss"]):
                    raise non_finite_stop(step + 1, f"loss is {parts['loss']} (tft {parts['tft']}, "
                                          f"lc {parts['lc']}, et {parts['et']})", ckpt_dir)
                params = [p for p in model.parameters() if p.grad is not None]
                # The gradients are FSDP2 shards (DTensors): the norm over all ranks' shards.
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params]).full_tensor()
                if not torch.isfinite(grad_norm):
                    raise non_finite_stop(step + 1, f"grad norm is {grad_norm.item()}", ckpt_dir)
                torch.nn.utils.clip_grads_with_norm_(params, cfg.max_grad_norm, grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                tokens = int(lengths.sum())                      # real tokens, all ranks
                padded = sum(padded_tokens(lengths[group]) for groups in plan for group in groups)
                row = {"step": step, "epoch": round(step / steps_per_epoch, 4), **parts, "lr": lr,
                       "grad_norm": grad_norm.item(), "tokens": tokens, "padded_tokens": padded,
                       "tokens_per_s": round(tokens / (time.perf_counter() - started), 1)}
                if device.type == "cuda":
                    row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                if val_examples and (step % cfg.eval_every == 0 or step == last_step):
                    row |= evaluate(model, val_examples, val_plan, cfg.mode, dft, pad_id, device)
                if is_main:
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    val = {"val": f"{row['val_loss']:.4f}"} if "val_loss" in row else {}
                    bar.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{lr:.2e}",
                                    tok_s=f"{row['tokens_per_s']:.0f}", **val)
                    bar.update(1)
                if step % cfg.save_every == 0 or step == last_step or stopped:
                    state = {"step": step, "epoch": step // steps_per_epoch,
                             "step_in_epoch": step % steps_per_epoch, "world_size": world,
                             "config": asdict(cfg), "data": data, "scheduler": schedule}
                    save_checkpoint(ckpt_dir, step, model, optimizer, state, cfg.keep_last)

        if stopped:
            if is_main:
                print(f"train.py: stopped by signal after step {step}; checkpoint saved. Rerun "
                      f"the same command to resume.", file=sys.stderr)
            return
        final = export(model, model_dir, out)
        if is_main:
            print(f"train.py: {step} steps done; the model is in {final}", file=sys.stderr)
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except SystemExit as stop:
        exit_with_one_line(stop)
