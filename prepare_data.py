"""Parallel Alpaca data (English + vi/zh/ar) -> validated, tokenised, memory-mapped arrays for DFT.
`python prepare_data.py --help` tells where the inputs come from and gives example commands.

The two files pair by index (a pair that cannot be used is dropped and counted by reason in
OUT/report.json); each text is encoded once and reused for the four training sequences:

    tft = x_tgt ; y_tgt        lc = x_tgt ; x_en        et = x_tgt ; y_en        en = x_en

x = BOS + the Alpaca prompt (ending in "### Response:"), y = output + EOS; lc's x_en has no BOS.

Output directory (FORMAT_VERSION 2), memory-mapped on load:
    {part}.ids.npy (int32, flat) + {part}.offsets.npy (int64, N+1) for part in x_tgt, y_tgt, x_en,
        y_en (sft: x_en, y_en): the uncut ids of every kept example n, ids[offsets[n]:offsets[n+1]]
    {side}_spans.npy (int32 [N, 4]) for side in tgt, en: [instruction start, end, input start, end)
        inside x_{side} (token positions, BOS = 0); an example without input has the span (0, 0)
    source_index.npy (int64 [N]): the index of each kept pair in the source files
    meta.json (max_len: where load_prepared cuts every sequence), report.json

Labels (all *_labels): labels[t] is the token at t+1 when that token is supervised, else -100; the
last position is always -100. The content masks mark x_tgt's and x_en's instruction and input
tokens: tgt_content in tft_tokens, en_content in en_tokens, lc_content in lc_labels (label space),
so that lc_labels[lc_content == 1] == en_tokens[en_content == 1] when nothing is cut.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model import IGNORE_INDEX, SAMPLE_DIR, Tokenizer, replace_dir

FORMAT_VERSION = 2  # 2: parts stored whole, cut at meta's max_len on load
TEMPLATE_ID = "alpaca-en/joint-v2"  # the template and its encoding (encode_prompt, encode_side)
DEFAULT_TOKENIZER = Path("models/Llama-2-7b-hf")  # train.py's default --model

# Stanford Alpaca's prompts, used with English words for every language (as x-LLM does).
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
FIELDS = ("instruction", "input", "output")

# Bounds on a pair's tgt/en token-count ratio (instruction + input + output, RATIO_SMOOTHING added
# to both so that short examples such as "4" vs "4" pass). Wide on purpose: LLaMA-2 splits vi/ar/zh
# into 2-4x as many tokens as English, Gemma-2 hardly at all; the check catches gross damage (a
# translation cut short, a pair shifted onto another example), not style.
RATIO_BOUNDS = {"vi": (0.33, 8.0), "zh": (0.2, 6.0), "ar": (0.33, 8.0)}
DEFAULT_RATIO_BOUNDS = (0.2, 8.0)
RATIO_SMOOTHING = 8

OVERLONG_POLICIES = ("truncate", "drop")
# SentencePiece writes a space as this character: a text holding it does not come back from its
# tokens (byte-level BPE tokenizers read it as any other character).
WORD_MARKER = "\u2581"
EXAMPLES_PER_REASON = 3  # drops printed per reason; report.json lists all
# The JSON name of each type json.loads returns, for messages about a record.
JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
              bool: "boolean", type(None): "null"}

DROP_REASONS = {
    "not_an_object": "record is not a JSON object",
    "missing_field": "a field is missing",
    "not_a_string": "a field is not a string",
    "empty_instruction": "empty instruction",
    "empty_output": "empty output",
    "word_marker": "a field holds '\u2581' (U+2581), the tokenizer's own space mark",
    "length_ratio": "implausible tgt/en token-length ratio",
    "too_long": "a sequence is longer than --max-len (--overlong drop)",
    "prompt_too_long": "the prompt fills --max-len: no response token left to supervise",
    "en_content_cut": "--max-len cuts x_en before its instruction (nothing for feature pooling)",
    "unpaired": "no partner in the other file (--allow-length-mismatch)",
}


def format_prompt(instruction: str, input: str) -> str:
    if input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# -------------------------------------------------------------------------------------------------
# Reading and validating the source files

def read_records(path: Path) -> list:
    """The JSON list in `path`, or one line saying what is wrong with the file."""
    expected = "expected a JSON list of {instruction, input, output} objects"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"{path}: not found; `python prepare_data.py --help` says where to get it")
    except UnicodeDecodeError as err:
        raise SystemExit(f"{path}: byte {err.start}: not UTF-8 ({err.reason}); save it as UTF-8")
    except json.JSONDecodeError as err:
        raise SystemExit(f"{path}: line {err.lineno} column {err.colno}: invalid JSON ({err.msg}); "
                         f"{expected}")
    if not isinstance(data, list):
        raise SystemExit(f"{path}: top level is a JSON {JSON_TYPES[type(data)]}; {expected}")
    return data


def record_defect(record, sentencepiece: bool) -> tuple[str, str] | None:
    """(reason, detail) when a record is unusable, else None; WORD_MARKER only if sentencepiece."""
    if not isinstance(record, dict):
        return "not_an_object", (f"is a JSON {JSON_TYPES[type(record)]}; "
                                 f"expected an object with fields {', '.join(FIELDS)}")
    for field in FIELDS:
        if field not in record:
            return "missing_field", f"field {field!r} is missing"
        if not isinstance(record[field], str):
            return "not_a_string", (f"field {field!r} is a JSON {JSON_TYPES[type(record[field])]}; "
                                    f"expected a string")
    for field in ("instruction", "output"):
        if not record[field].strip():
            return f"empty_{field}", f"field {field!r} is empty"
    for field in FIELDS if sentencepiece else ():
        if WORD_MARKER in record[field]:
            return "word_marker", (f"field {field!r} holds U+2581, the tokenizer's space mark; "
                                   f"replace it (e.g. by '_') to keep the record")
    return None


def find_duplicates(records: list) -> dict:
    """Records identical to an earlier one. Reported, never dropped: Alpaca has real ones."""
    first_seen = {}
    duplicates = []
    for index, record in enumerate(records):
        if record_defect(record, sentencepiece=False) is None:
            key = tuple(record[field] for field in FIELDS)
            if key in first_seen:
                duplicates.append({"index": index, "same_as": first_seen[key]})
            first_seen.setdefault(key, index)
    return {"count": len(duplicates), "examples": duplicates[:10]}


# -------------------------------------------------------------------------------------------------
# Tokenisation

@dataclass
class EncodedSide:  # one side (English or target language) of a pair, tokenised
    prompt: np.ndarray    # int32: BOS + template with instruction [and input]
    response: np.ndarray  # int32: output + EOS
    spans: tuple[int, int, int, int]  # [instruction start, end), [input start, end) in `prompt`
    content_tokens: int   # instruction + input + output tokens, for the ratio check


def encode_prompt(tokenizer, instruction: str, input: str) -> tuple[list[int], tuple]:
    """BOS + the Alpaca prompt encoded as one text, as a user's prompt is at inference, and the
    spans of the tokens overlapping each field's characters (a piece merging a field's last
    character with the template's newline counts as the field's)."""
    template = PROMPT_WITH_INPUT if input.strip() else PROMPT_NO_INPUT
    start = template.index("{instruction}")
    fields = [(start, start + len(instruction))]
    if template is PROMPT_WITH_INPUT:
        start = template.index("{input}") - len("{instruction}") + len(instruction)
        fields.append((start, start + len(input)))
    ids, offsets = tokenizer.encode_with_offsets(format_prompt(instruction, input), bos=True)
    spans = [0, 0, 0, 0]
    for f, (first, last) in enumerate(fields):
        inside = [k for k, (a, b) in enumerate(offsets) if a < last and b > first]
        if inside:
            spans[2 * f:2 * f + 2] = [inside[0], inside[-1] + 1]
    return ids, tuple(spans)


def alpaca_prompt_ids(tokenizer, instruction: str, input: str = "") -> list[int]:
    """The prompt exactly as training saw it, for generating from a model trained on this data."""
    return encode_prompt(tokenizer, instruction, input)[0]


def encode_side(tokenizer, record: dict) -> EncodedSide:
    prompt, spans = encode_prompt(tokenizer, record["instruction"], record["input"])
    # A text of its own, so the response starts a word ("▁Paris") whatever the prompt ends in.
    output = tokenizer.encode(record["output"], bos=False)
    return EncodedSide(
        prompt=np.asarray(prompt, dtype=np.int32),
        response=np.asarray(output + [tokenizer.eos_id], dtype=np.int32),
        spans=spans,
        content_tokens=(spans[1] - spans[0]) + (spans[3] - spans[2]) + len(output),
    )


def supervised_ranges(en: EncodedSide, tgt: EncodedSide | None,
                      bos: bool) -> dict[str, tuple[int, list]]:
    """Per sequence kind built from a pair (sft: only tft, made of the English side): its length and
    the [start, end) token ranges it supervises; for en, the instruction and input tokens the
    feature losses pool over. bos: whether prompts start with a BOS (Qwen2's do not)."""
    if tgt is None:
        length = len(en.prompt) + len(en.response)
        return {"tft": (length, [(len(en.prompt), length)])}
    prompt_len = len(tgt.prompt)
    lengths = {"tft": prompt_len + len(tgt.response),
               "lc": prompt_len + len(en.prompt) - bos,  # x_en's BOS is not repeated
               "et": prompt_len + len(en.response)}
    ranges = {kind: (length, [(prompt_len, length)]) for kind, length in lengths.items()}
    # LC's default targets (lc_content_only): x_en's instruction and input, not its template words.
    shift = prompt_len - bos
    ranges["lc_content"] = (lengths["lc"], [(shift + s, shift + e)
                                            for s, e in (en.spans[:2], en.spans[2:])])
    ranges["en"] = (len(en.prompt), [en.spans[:2], en.spans[2:]])
    return ranges


def sequence_stats(kept_ranges: list[dict], max_len: int) -> dict:
    """Per sequence kind, over the kept pairs' supervised_ranges: lengths before the cut, how many
    sequences the cut shortens, how many of their supervised tokens it removes, and how many it
    leaves with none (their loss part is empty for that pair)."""
    stats = {}
    for kind in kept_ranges[0] if kept_ranges else ():
        lengths = [ranges[kind][0] for ranges in kept_ranges]
        supervised = [(start, end) for ranges in kept_ranges for start, end in ranges[kind][1]]
        n_supervised = sum(end - start for start, end in supervised)
        n_cut = sum(max(0, end - max(start, max_len)) for start, end in supervised)
        # A sequence whose first target token lies past the cut keeps none.
        firsts = [min((start for start, end in ranges[kind][1] if end > start), default=None)
                  for ranges in kept_ranges]
        emptied = sum(first is not None and first >= max_len for first in firsts)
        stats[kind] = {"max": max(lengths), "mean": round(float(np.mean(lengths)), 1),
                       "truncated": sum(length > max_len for length in lengths),
                       "supervised_tokens": n_supervised, "cut_tokens": n_cut, "emptied": emptied,
                       "cut_share": round(n_cut / max(n_supervised, 1), 5)}
    return stats


# -------------------------------------------------------------------------------------------------
# The whole preparation

@dataclass
class PrepareConfig:
    lang: str | None = None        # target language; None with sft
    en: Path | None = None         # English file; None -> bundled sample
    tgt: Path | None = None        # target-language file; None -> bundled sample
    tokenizer: Path = DEFAULT_TOKENIZER
    out: Path | None = None        # None -> data/prepared/{lang} or data/prepared/sft-en
    max_len: int = 512
    overlong: str = "truncate"     # one of OVERLONG_POLICIES
    allow_length_mismatch: bool = False
    sft: bool = False
    overwrite: bool = False
    ratio_bounds: tuple[float, float] | None = None  # None -> RATIO_BOUNDS[lang] or the default


def resolve_config(cfg: PrepareConfig) -> PrepareConfig:
    """Defaults that depend on the language and mode; one line for an impossible combination."""
    if cfg.sft:
        if cfg.tgt is not None:
            raise SystemExit("--tgt: SFT data is English only (--sft); drop --tgt or drop --sft")
        lang, en, tgt = "en", cfg.en or SAMPLE_DIR / "alpaca_en.json", None
    else:
        if not cfg.lang:
            raise SystemExit("--lang is required (e.g. --lang vi); --sft makes English-only data")
        if cfg.lang == "en":
            raise SystemExit("--lang en: not a target language; use --sft for English-only data")
        if (cfg.en is None) != (cfg.tgt is None):
            raise SystemExit("--en and --tgt go together: give both, or neither (bundled sample)")
        lang, en, tgt = cfg.lang, cfg.en, cfg.tgt
        if en is None:
            en, tgt = SAMPLE_DIR / "alpaca_en.json", SAMPLE_DIR / f"alpaca_{lang}.json"
            if not tgt.is_file():
                raise SystemExit(f"{tgt}: no bundled sample for --lang {lang}; pass --en and --tgt")
    if cfg.max_len < 8:
        raise SystemExit(f"--max-len {cfg.max_len}: too small for the Alpaca prompt; use e.g. 512")
    if cfg.overlong not in OVERLONG_POLICIES:
        raise SystemExit(f"--overlong {cfg.overlong}: expected {' or '.join(OVERLONG_POLICIES)}")
    bounds = cfg.ratio_bounds or RATIO_BOUNDS.get(lang, DEFAULT_RATIO_BOUNDS)
    if not 0 < bounds[0] < bounds[1]:
        raise SystemExit(f"--ratio-bounds {bounds[0]} {bounds[1]}: expected 0 < LOW < HIGH")
    out = cfg.out or Path("data/prepared") / ("sft-en" if cfg.sft else lang)
    return replace(cfg, lang=lang, en=Path(en), tgt=None if tgt is None else Path(tgt),
                   out=Path(out), tokenizer=Path(cfg.tokenizer), ratio_bounds=tuple(bounds))


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer(path)
    except ValueError as err:  # model.py's one-line CheckpointError: no tokenizer, or unreadable
        raise SystemExit(str(err)) from None


def staging_dir(out: Path) -> Path:
    return out.with_name(out.name + ".tmp")


def cannot_write(out: Path, err: OSError) -> SystemExit:
    return SystemExit(f"--out {out}: cannot write there ({err}); choose a writable --out directory")


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Before any work: refuse a directory this script did not write, or prepared data without
    --overwrite; check that the staging directory can be made (removing a crashed run's)."""
    try:
        meta = json.loads((out / "meta.json").read_text())
        prepared = meta.get("created_by") == "prepare_data.py"
    except (OSError, ValueError, AttributeError):
        prepared = False
    if out.exists() and not prepared and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"{out}: not a prepared-data directory; choose another --out or remove it")
    if prepared and not overwrite:
        raise SystemExit(f"{out}: already holds prepared data; pass --overwrite or another --out")
    try:
        shutil.rmtree(staging_dir(out), ignore_errors=True)
        staging_dir(out).mkdir(parents=True)
        staging_dir(out).rmdir()
    except OSError as err:
        raise cannot_write(out, err) from None


def overlong_defect(en: EncodedSide, tgt: EncodedSide | None, ranges: dict,
                    cfg: PrepareConfig) -> tuple[str, str] | None:
    """(reason, detail) when the over-long policy leaves the pair out, None when it is kept.
    truncate keeps a pair only when x_tgt is shorter than max_len (else TFT has nothing left to
    supervise), so x_tgt is never cut and stays the same prefix of tft, lc and et; and only when
    x_en keeps an instruction token (the feature losses pool over them)."""
    max_len = cfg.max_len
    too_long = {kind: length for kind, (length, _) in ranges.items()
                if length > max_len and kind != "lc_content"}  # lc_content: lc's length
    if too_long and cfg.overlong == "drop":
        return "too_long", (", ".join(f"{kind} has {n} tokens" for kind, n in too_long.items())
                            + f" > --max-len {max_len}")
    prompt_len = len((en if tgt is None else tgt).prompt)
    if prompt_len >= max_len:
        return "prompt_too_long", f"the prompt has {prompt_len} tokens >= --max-len {max_len}"
    if tgt is not None and en.spans[0] >= max_len:
        return "en_content_cut", f"x_en's instruction at token {en.spans[0]} >= --max-len {max_len}"
    return None


def prepare(cfg: PrepareConfig) -> dict:
    """Validate, tokenise and write one prepared directory; returns the report."""
    started = time.perf_counter()
    cfg = resolve_config(cfg)
    check_output_dir(cfg.out, cfg.overwrite)
    tokenizer = load_tokenizer(cfg.tokenizer)
    files = {"en": cfg.en} if cfg.sft else {"en": cfg.en, "tgt": cfg.tgt}
    records = {side: read_records(path) for side, path in files.items()}
    n_pairs = min(len(side_records) for side_records in records.values())
    drops = []  # one entry per dropped pair (its first defect)

    longer = max(files, key=lambda side: len(records[side]))
    if len(records[longer]) > n_pairs:
        if not cfg.allow_length_mismatch:
            raise SystemExit(f"{cfg.en} has {len(records['en'])} examples but {cfg.tgt} has "
                             f"{len(records['tgt'])}; they pair by index: fix the files, or pass "
                             f"--allow-length-mismatch to pair the first {n_pairs}")
        drops += [{"reason": "unpaired", "file": str(files[longer]), "index": index,
                   "detail": f"beyond the {n_pairs} examples of the shorter file"}
                  for index in range(n_pairs, len(records[longer]))]

    kept = []  # (index, {side: EncodedSide})
    kept_ranges = []
    ratios = []
    low, high = cfg.ratio_bounds
    sentencepiece = tokenizer.sp is not None
    # One process: on 52k pairs, worker processes measured no faster.
    for index in tqdm(range(n_pairs), desc="tokenising", unit="ex", dynamic_ncols=True,
                      leave=False):
        defects = [(files[side], found) for side in files
                   if (found := record_defect(records[side][index], sentencepiece))]
        if defects:
            file, (reason, detail) = defects[0]
            drops.append({"reason": reason, "file": str(file), "index": index, "detail": detail})
            continue
        pair = {side: encode_side(tokenizer, records[side][index]) for side in files}
        en, tgt = pair["en"], pair.get("tgt")
        defect = None
        if tgt is not None:
            ratio = (tgt.content_tokens + RATIO_SMOOTHING) / (en.content_tokens + RATIO_SMOOTHING)
            ratios.append(ratio)
            if not low <= ratio <= high:
                defect = "length_ratio", (f"{tgt.content_tokens} target tokens vs "
                                          f"{en.content_tokens} English: smoothed ratio "
                                          f"{ratio:.2f} outside [{low}, {high}]")
        ranges = supervised_ranges(en, tgt, tokenizer.bos_id is not None)
        defect = defect or overlong_defect(en, tgt, ranges, cfg)
        if defect:
            reason, detail = defect
            drops.append({"reason": reason, "file": str(cfg.tgt or cfg.en), "index": index,
                          "detail": detail})
        else:
            kept.append((index, pair))
            kept_ranges.append(ranges)

    drops.sort(key=lambda drop: (drop["index"], drop["file"]))
    dropped = Counter(drop["reason"] for drop in drops)
    report = {
        "lang": cfg.lang,
        "mode": "sft" if cfg.sft else "parallel",
        "files": {side: str(path) for side, path in files.items()},
        "records": {side: len(side_records) for side, side_records in records.items()},
        "kept": len(kept),
        "dropped": {reason: dropped[reason] for reason in DROP_REASONS if dropped[reason]},
        "max_len": cfg.max_len, "overlong": cfg.overlong,
        "sequences": sequence_stats(kept_ranges, cfg.max_len),
        "duplicates_kept": {str(files[side]): find_duplicates(side_records)
                            for side, side_records in records.items()},
        "drops": drops,
    }
    if not cfg.sft:
        points = {"min": 0, "p01": 0.01, "median": 0.5, "p99": 0.99, "max": 1}
        values = np.quantile(ratios, list(points.values())) if ratios else []   # one sort
        report["ratio"] = {"bounds": [low, high]} | {
            name: round(float(value), 3) for name, value in zip(points, values)}
    report["seconds"] = round(time.perf_counter() - started, 2)
    write_prepared(cfg, tokenizer, kept, report)
    print(format_report(report, cfg.out), file=sys.stderr)
    return report


def write_prepared(cfg: PrepareConfig, tokenizer, kept: list, report: dict) -> None:
    """Write arrays, meta.json and report.json into the staging directory, then swap it in: never
    a half directory, and one line when the disk refuses."""
    tmp = staging_dir(cfg.out)
    truncated = {kind: {"sequences": s["truncated"], "cut_share": s["cut_share"]}
                 for kind, s in report["sequences"].items()}
    try:
        tmp.mkdir(parents=True)
        for side in report["files"]:
            encoded = [pair[side] for _, pair in kept]
            for part, attr in (("x", "prompt"), ("y", "response")):
                pieces = [getattr(e, attr) for e in encoded]
                offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
                offsets[1:] = np.cumsum([len(p) for p in pieces])
                ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
                np.save(tmp / f"{part}_{side}.ids.npy", ids.astype(np.int32, copy=False))
                np.save(tmp / f"{part}_{side}.offsets.npy", offsets)
            spans = np.asarray([e.spans for e in encoded], dtype=np.int32).reshape(-1, 4)
            np.save(tmp / f"{side}_spans.npy", spans)
        np.save(tmp / "source_index.npy", np.asarray([i for i, _ in kept], dtype=np.int64))
        meta = {
            "format_version": FORMAT_VERSION,
            "created_by": "prepare_data.py",
            "lang": cfg.lang,
            "mode": report["mode"],
            "num_examples": len(kept),
            "tokenizer_sha256": tokenizer.sha256,
            "bos_id": tokenizer.bos_id,
            "max_len": cfg.max_len,
            "overlong": cfg.overlong,
            "template": TEMPLATE_ID,
            "counts": {"records": report["records"], "kept": report["kept"],
                       "dropped": report["dropped"], "truncated": truncated},
            "sources": {side: {"path": path,
                               "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}
                        for side, path in report["files"].items()},
        }
        for name, content in (("meta.json", meta), ("report.json", report)):
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        replace_dir(tmp, cfg.out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise cannot_write(cfg.out, err) from None


def format_report(report: dict, out: Path) -> str:
    total = max(report["records"].values())
    lines = [f"prepare_data: {report['mode']} {report['lang']}: {total} examples -> "
             f"{report['kept']} kept, {total - report['kept']} dropped ({report['seconds']} s)"]
    for reason, count in report["dropped"].items():
        lines.append(f"  dropped {count:>6}  {reason}: {DROP_REASONS[reason]}")
        examples = [d for d in report["drops"] if d["reason"] == reason][:EXAMPLES_PER_REASON]
        lines += [f"      {d['file']}[{d['index']}]: {d['detail']}" for d in examples]
        if count > len(examples):
            lines.append(f"      ... all {count} in {out / 'report.json'}")
    for path, dup in report["duplicates_kept"].items():
        if dup["count"]:
            shown = ", ".join(f"[{d['index']}]=[{d['same_as']}]"
                              for d in dup["examples"][:EXAMPLES_PER_REASON])
            more = ", ..." if dup["count"] > EXAMPLES_PER_REASON else ""
            lines.append(f"  duplicates kept: {path}: {dup['count']} ({shown}{more})")
    if "median" in report.get("ratio", {}):
        r = report["ratio"]
        lines.append(f"  tgt/en token ratio: min {r['min']} p1 {r['p01']} median {r['median']} "
                     f"p99 {r['p99']} max {r['max']} (bounds {r['bounds'][0]}..{r['bounds'][1]})")
    lines.append(f"  sequences (tokens before the cut; --overlong {report['overlong']} "
                 f"at {report['max_len']}):")
    targets = {"en": "content tokens (feature pooling)",
               "lc_content": "LC's default targets (x_en's instruction+input)"}
    for kind, s in report["sequences"].items():
        what = targets.get(kind, "supervised tokens")
        lines.append(f"    {kind:<10} max {s['max']:>5} mean {s['mean']:>7}  "
                     f"{s['truncated']:>6} truncated, {100 * s['cut_share']:.2f}% of {what} cut"
                     + (f"; {s['emptied']} rows keep none" if s["emptied"] else ""))
    lines.append(f"  wrote {out} (report.json, meta.json)")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# Reading prepared data (train.py)

def prepare_command(mode: str, lang: str | None, tokenizer="MODEL_DIR", out=None) -> str:
    """The command line that makes prepared data of a mode ("parallel" | "sft"): the fix named by
    every one-line error about missing or unfit data."""
    command = "python prepare_data.py " + ("--sft" if mode == "sft" else f"--lang {lang or 'LANG'}")
    return command + f" --tokenizer {tokenizer}" + (f" --out {out}" if out else "")


def check_meta(meta: dict, lang: str, mode: str, tokenizer_sha256: str, path) -> None:
    """One-line refusal of prepared data made for another mode ("parallel" | "sft"), language or
    tokenizer. sft data is English whatever language the model is evaluated on: lang unchecked."""
    remake = prepare_command(mode, lang, out=path)
    for field, what, needed in (("mode", "mode", mode), ("lang", "language", lang),
                                ("tokenizer_sha256", "tokenizer", tokenizer_sha256)):
        if meta.get(field) != needed and not (field == "lang" and mode == "sft"):
            raise SystemExit(f"{path}/meta.json: {field}={meta.get(field)!r}, another {what} than "
                             f"this run's {needed!r}; make it with: {remake}")


def supervised_sequence(kind: str, prompt: np.ndarray, continuation: np.ndarray,
                        max_len: int) -> dict[str, torch.Tensor]:
    """{kind}_tokens = (prompt ; continuation) cut after max_len tokens (len(prompt) < max_len),
    {kind}_labels supervising exactly the continuation's tokens that are left, {kind}_mask."""
    tokens = torch.from_numpy(np.concatenate([prompt, continuation])[:max_len])
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[len(prompt) - 1:-1] = tokens[len(prompt):]
    return {f"{kind}_tokens": tokens, f"{kind}_labels": labels,
            f"{kind}_mask": torch.ones_like(tokens)}


def span_mask(length: int, spans: np.ndarray, shift: int) -> torch.Tensor:
    """1 on [start + shift, end + shift) of the instruction and input spans, cut at `length`."""
    mask = torch.zeros(length, dtype=torch.long)
    for start, end in ((spans[0], spans[1]), (spans[2], spans[3])):
        if end > start:
            mask[start + shift:end + shift] = 1
    return mask


class PreparedDataset:
    """Examples of a prepared directory as dicts of 1-D int64 tensors (+ tgt_prompt_len, an int):
    the keys of collate's batch, every sequence cut after meta's max_len tokens."""

    def __init__(self, meta: dict, arrays: dict[str, np.ndarray]):
        self.meta = meta
        self.arrays = arrays
        self.max_len = meta["max_len"]

    def __len__(self) -> int:
        return len(self.arrays["source_index"])

    def source_index(self, i: int) -> int:
        return int(self.arrays["source_index"][i])

    def _part(self, part: str, i: int) -> np.ndarray:
        offsets = self.arrays[f"{part}.offsets"]
        return np.asarray(self.arrays[f"{part}.ids"][offsets[i]:offsets[i + 1]], dtype=np.int64)

    def __getitem__(self, i: int) -> dict:
        i = range(len(self))[i]  # an IndexError past the end, and a negative i from the end
        x_en, y_en = self._part("x_en", i), self._part("y_en", i)
        if self.meta["mode"] == "sft":
            tft = supervised_sequence("tft", x_en, y_en, self.max_len)
            return tft | {"tgt_prompt_len": len(x_en)}
        x_tgt, y_tgt = self._part("x_tgt", i), self._part("y_tgt", i)
        tgt_spans, en_spans = self.arrays["tgt_spans"][i], self.arrays["en_spans"][i]
        prompt_len = len(x_tgt)  # < max_len in every kept pair: x_tgt is never cut
        bos = int(self.meta["bos_id"] is not None)  # Qwen2's prompts have no BOS
        example = (supervised_sequence("tft", x_tgt, y_tgt, self.max_len)
                   | supervised_sequence("lc", x_tgt, x_en[bos:], self.max_len)
                   | supervised_sequence("et", x_tgt, y_en, self.max_len))
        en_tokens = torch.from_numpy(x_en[:self.max_len])
        # x_en token k (k >= bos) sits at lc position prompt_len + k - bos and is the label of the
        # position before; a label lost to the cut is no content.
        lc_content = span_mask(len(example["lc_tokens"]), en_spans, shift=prompt_len - bos - 1)
        return example | {
            "tgt_prompt_len": prompt_len,
            "tgt_content": span_mask(len(example["tft_tokens"]), tgt_spans, shift=0),
            "lc_content": lc_content * (example["lc_labels"] != IGNORE_INDEX),
            "en_tokens": en_tokens, "en_mask": torch.ones_like(en_tokens),
            "en_content": span_mask(len(en_tokens), en_spans, shift=0),
        }


def data_identity(path) -> str:
    """A digest of a prepared directory: meta.json's bytes and every array's name and size. Cheap
    (no array is read), and it changes whenever prepare_data.py rewrites the directory with other
    inputs or flags; train.py records it in its checkpoints and refuses to resume on other data."""
    path = Path(path)
    digest = hashlib.sha256((path / "meta.json").read_bytes())
    for file in sorted(path.glob("*.npy")):
        digest.update(f"\n{file.name} {file.stat().st_size}".encode())
    return digest.hexdigest()


def load_prepared(path, make_command: str | None = None) -> PreparedDataset:
    """Open a prepared directory (memory-mapped); one line when it is missing, old or damaged.
    make_command: the command a missing directory's message shows (default: a generic one)."""
    path = Path(path)
    meta_file = path / "meta.json"
    rewrite = f"rerun prepare_data.py with --overwrite --out {path}"
    if not meta_file.is_file():
        make = make_command or prepare_command("parallel", None, out=path) + " (or --sft)"
        raise SystemExit(f"{meta_file}: not found; make the data with: {make}")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise SystemExit(f"{meta_file}: not valid JSON ({err}); "
                         f"remove {path} and rerun prepare_data.py")
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise SystemExit(f"{meta_file}: format_version={found!r}, not {FORMAT_VERSION}; {rewrite}")
    if meta.get("mode") not in ("parallel", "sft"):
        raise SystemExit(f"{meta_file}: mode={meta.get('mode')!r}; expected 'parallel' or 'sft'")
    sides = ("en",) if meta["mode"] == "sft" else ("en", "tgt")
    names = ["source_index"] + [f"{side}_spans" for side in sides] + [
        f"{part}_{side}.{kind}" for side in sides for part in ("x", "y")
        for kind in ("ids", "offsets")]
    arrays = {}
    for name in names:
        file = path / f"{name}.npy"
        try:
            arrays[name] = np.load(file, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise SystemExit(f"{file}: missing; {rewrite}")
        except (ValueError, OSError) as err:
            raise SystemExit(f"{file}: unreadable ({err}); {rewrite}")

    n = len(arrays["source_index"])
    problems = []
    if n != meta.get("num_examples"):
        problems.append(f"source_index has {n} entries, meta.json says {meta.get('num_examples')}")
    if not isinstance(meta.get("max_len"), int) or meta["max_len"] < 1:
        problems.append(f"meta.json has max_len={meta.get('max_len')!r}, not a number of tokens")
    for side in sides:
        if arrays[f"{side}_spans"].shape != (n, 4):
            problems.append(f"{side}_spans shape {arrays[f'{side}_spans'].shape} != ({n}, 4)")
        for part in ("x", "y"):
            ids, offsets = arrays[f"{part}_{side}.ids"], arrays[f"{part}_{side}.offsets"]
            if (offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(ids)
                    or ids.ndim != 1):
                problems.append(f"{part}_{side}: {len(offsets)} offsets for {n} examples do not "
                                f"index its {len(ids)} ids")
    if problems:
        raise SystemExit(f"{path}: damaged prepared data: {'; '.join(problems)}; {rewrite}")
    return PreparedDataset(meta, arrays)


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: *_tokens padded with pad_id, *_labels with -100, masks with 0."""
    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        if isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.long)
            continue
        fill = IGNORE_INDEX if key.endswith("_labels") else pad_id if key.endswith("_tokens") else 0
        padded = torch.full((len(values), max(len(v) for v in values)), fill, dtype=torch.long)
        for row, value in enumerate(values):
            padded[row, :len(value)] = value
        batch[key] = padded
    return batch


# -------------------------------------------------------------------------------------------------
# CLI

EPILOG = """\
where the real files come from: x-LLM's data archive, linked in the README of
https://github.com/NJUNLP/x-LLM
  target   data/alpaca/alpaca_{lang}.json, x-LLM's translations (lang: ar el es hi ru tr vi zh)
  English  data/alpaca/alpaca_en.json from the same archive (Stanford Alpaca's alpaca_data.json,
           52,002 examples: https://github.com/tatsu-lab/stanford_alpaca)
  Both are JSON lists of {"instruction", "input", "output"}, aligned by index. The tgt/en
  token-ratio check drops pairs that do not look like translations of each other: many such
  drops mean the files are misaligned.

output: OUT/ is what train.py --data OUT reads; OUT/report.json lists every dropped pair and why.

examples:
  python prepare_data.py --lang vi                  # bundled sample, models/Llama-2-7b-hf tokenizer
  python prepare_data.py --lang zh --en alpaca_en.json --tgt alpaca_zh.json \\
      --tokenizer models/gemma-2-2b
  python prepare_data.py --sft --en alpaca_en.json  # English-only data for the SFT baseline
"""


def parse_args(argv: list[str] | None = None) -> PrepareConfig:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lang", help="target language code: vi, zh, ar, or others with "
                                       "--en/--tgt (no default: required unless --sft)")
    parser.add_argument("--en", type=Path, metavar="FILE",
                        help="English Alpaca JSON (default: bundled sample)")
    parser.add_argument("--tgt", type=Path, metavar="FILE",
                        help="target-language Alpaca JSON, same order (default: bundled sample)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, metavar="MODEL_DIR",
                        help="model dir or its tokenizer file (default: %(default)s)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="output dir (default: data/prepared/LANG or data/prepared/sft-en)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the prepared data already in --out (default: refuse)")
    parser.add_argument("--max-len", type=int, default=PrepareConfig.max_len, metavar="N",
                        help="max tokens per training sequence (default: %(default)s)")
    parser.add_argument("--overlong", choices=OVERLONG_POLICIES, default=PrepareConfig.overlong,
                        help="sequences longer than --max-len: truncate = cut them there, "
                             "losing the labels past the cut, as Stanford Alpaca does (a pair "
                             "whose prompt fills --max-len is dropped); drop = leave out the "
                             "whole pair (default: %(default)s)")
    parser.add_argument("--allow-length-mismatch", action="store_true",
                        help="files with different numbers of records: pair the first min(n) by "
                             "index and drop the rest (default: refuse)")
    parser.add_argument("--sft", action="store_true",
                        help="English-only data for the SFT baseline (default: parallel data)")
    parser.add_argument("--ratio-bounds", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="allowed tgt/en token-length ratio (default per language: "
                             + ", ".join(f"{k} {lo}-{hi}" for k, (lo, hi) in RATIO_BOUNDS.items())
                             + f", others {DEFAULT_RATIO_BOUNDS[0]}-{DEFAULT_RATIO_BOUNDS[1]})")
    return PrepareConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> dict:
    return prepare(parse_args(argv))


if __name__ == "__main__":
    main()
