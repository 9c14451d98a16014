"""Zero-shot evaluation on the paper's 8 benchmarks, from their original release files, with the
official metrics.

    python evaluate.py --model OUT/final --langs vi,ar,zh --tasks all --data-dir BENCH_DIR
    python evaluate.py --model OUT/final --tasks xnli,xcopa --limit 200         # a quick look
    python evaluate.py --model OUT/final --prompt "Thủ đô của Việt Nam là gì?"  # greedy
    python evaluate.py --model OUT/final --logit-lens --lens-lang vi            # per-layer lens

Writes into --out: results.json (rows {"task", "lang", "metric", "value" in [0, 100], "n",
"prompt" naming the protocol, "file"}), results.md (the paper's Tables 1 and 2 with its rows for
the model's family, then per task and language the file, split and protocol) and predictions/,
this run's <task>.<lang>.jsonl files, one line per example: results.json is recomputable from them.

BENCH_DIR holds the files exactly as the benchmarks release them (nothing is downloaded; MKQA's
may be unpacked), at the paths listed at the end of --help.

Multiple choice: the log-likelihood of each choice (acc) and the same per character (acc_norm),
prompts as lm-evaluation-harness (XNLI, XCOPA, XStoryCloze) and Okapi (MMLU, TruthfulQA).
Generative QA: x-LLM's prompts in the Alpaca template, greedy decoding, the official MLQA script's
F1 / EM (MKQA adds its aliases and its rule for unanswerable questions). The logit lens reads each
layer's residual stream through the final norm and the output head on target-language Alpaca
records and suggests --lc-layer / --et-layer from the entropy curve's drops (the paper: near
layers 2 and 15 of LLaMA-2-7B); run it before and after DFT to see what moved.
"""
from __future__ import annotations

import argparse
import csv
import functools
import gzip
import json
import math
import re
import shutil
import string
import sys
import tempfile
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from model import Tokenizer, Transformer, default_layers, replace_dir, resolve_dtype, write_atomic
from prepare_data import (SAMPLE_DIR, alpaca_prompt_ids, format_prompt, load_tokenizer,
                          read_records, record_defect)

try:                                        # optional: only the logit lens's PNG needs it
    from matplotlib.figure import Figure    # no pyplot: no GUI backend, no global state
    from matplotlib.ticker import MaxNLocator
except ImportError:
    Figure = MaxNLocator = None

LANGS = ("vi", "ar", "zh")          # the paper's languages; every table below has an entry for each
REPO_DIR = Path(__file__).resolve().parent
BENCH_SAMPLE_DIR = SAMPLE_DIR.parent / "bench_sample"   # a few rows per benchmark: a format check

# --- Prompts (facts from the projects named; "I" marks our own choice where nobody states one) ----

# x-LLM's XQuAD / MLQA instruction and input per language (the input ends in a space, as there).
QA_INSTRUCTION = {
    "vi": "Hãy trả lời các câu hỏi theo đoạn văn sau",
    "ar": "الرجاء الإجابة على الأسئلة بناءً على الفقرات التالية",
    "zh": "请根据以下段落，回答问题",
}
QA_INPUT = {
    "vi": "đoạn văn: {context}\ncâu hỏi: {question}\nTrả lời: ",
    "ar": "فقرة: {context}\nسؤال: {question}\nإجابة: ",
    "zh": "段落: {context}\n问题: {question}\n答案: ",
}
# I: MKQA has no context and x-LLM no MKQA prompt: the same form without the paragraph.
MKQA_INSTRUCTION = {
    "vi": "Hãy trả lời câu hỏi sau",
    "ar": "الرجاء الإجابة على السؤال التالي",
    "zh": "请回答以下问题",
}
MKQA_INPUT = {
    "vi": "câu hỏi: {question}\nTrả lời: ",
    "ar": "سؤال: {question}\nإجابة: ",
    "zh": "问题: {question}\n答案: ",
}
MKQA_KEY = {"vi": "vi", "ar": "ar", "zh": "zh_cn"}      # MKQA's language keys

# lm-evaluation-harness XNLI: "{premise}, {question word}?" + " {label word}, {hypothesis}".
XNLI_WORDS = {   # question word, then the label words for entailment, neutral, contradiction
    "vi": ("đúng", "Vâng", "Vì vậy", "Không"),
    "ar": ("صحيح", "نعم", "لذا", "رقم"),
    "zh": ("正确", "是的", "所以", "不是的"),
}
XNLI_LABELS = ("entailment", "neutral", "contradiction")
# lm-evaluation-harness XCOPA: premise without its final period + " {connector}", then " {choice}".
XCOPA_CONNECTORS = {"vi": {"cause": "bởi vì", "effect": "vì vậy"},
                    "zh": {"cause": "因为", "effect": "所以"}}

# Okapi's TruthfulQA context: the original TruthfulQA "QA prompt", six English QA pairs.
TRUTHFULQA_PREFIX = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)
MMLU_LETTERS = ("A", "B", "C", "D")


# --- Metrics: the MLQA script's normalisation, F1 and EM; MKQA's rule for unanswerable ones -------

# The MLQA script's article patterns, for English and our languages. Its Arabic pattern's first
# branch ("\s" + "ال" + "^") can never match, so in effect every "ال" is replaced by a space,
# inside words too ("مالك" -> "م ك"): a quirk kept on purpose.
MLQA_ARTICLES = {
    "en": r"\b(a|an|the)\b",
    "vi": r"\b(của|là|cái|chiếc|những)\b",
    "ar": r"\sال^|ال",
    "zh": None,
}
CJK_CHAR = re.compile(r"[\u4e00-\u9fa5]")     # the MLQA script's range: basic CJK block only


def is_punct(ch: str) -> bool:
    """The MLQA script's punctuation: Unicode category P* plus ASCII string.punctuation."""
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def mixed_segmentation(text: str) -> list[str]:
    """MLQA's zh tokens: each CJK character and punctuation mark alone, the rest split on spaces."""
    tokens, run = [], ""
    for ch in text:
        if CJK_CHAR.match(ch) or is_punct(ch):
            tokens += run.split()
            run = ""
            tokens.append(ch)
        else:
            run += ch
    return tokens + run.split()


def normalize_answer(text: str, lang: str) -> str:
    if lang not in MLQA_ARTICLES:
        raise ValueError(f"lang={lang!r}: the MLQA normalisation knows {sorted(MLQA_ARTICLES)}")
    text = "".join(ch for ch in text.lower() if not is_punct(ch))
    if MLQA_ARTICLES[lang]:
        text = re.sub(MLQA_ARTICLES[lang], " ", text)
    tokens = mixed_segmentation(text) if lang == "zh" else text.split()
    return " ".join(t for t in tokens if t.strip())


def _token_f1(pred: list[str], gold: list[str]) -> float:
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _answers(answers) -> list[str]:
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError("answers is empty; the official scripts take a max over the gold answers")
    return answers


def qa_f1(prediction: str, answers, lang: str) -> float:
    """The MLQA script's F1 in [0, 1], max over the gold answers; as there, nothing scores without
    a shared token, even empty against empty."""
    pred = normalize_answer(prediction, lang).split()
    return max(_token_f1(pred, normalize_answer(a, lang).split()) for a in _answers(answers))


def qa_em(prediction: str, answers, lang: str) -> float:
    """Exact match (0 or 1) after the MLQA normalisation, max over the gold answers (as MKQA's)."""
    pred = normalize_answer(prediction, lang)
    return float(max(pred == normalize_answer(a, lang) for a in _answers(answers)))


def mkqa_f1(prediction: str, answers, lang: str) -> float:
    """F1 with MKQA's rule for an empty gold (unanswerable, long_answer) or prediction: 1 when both
    are empty, else 0. Tokens as MLQA's, so the QA tasks are scored alike (MKQA's script splits
    zh by character and strips only ASCII punctuation)."""
    pred = normalize_answer(prediction, lang).split()
    golds = [normalize_answer(a, lang).split() for a in _answers(answers)]
    return max(float(gold == pred) if not gold or not pred else _token_f1(pred, gold)
               for gold in golds)


def pick_choice(scores, ties: str = "wrong") -> int | None:
    """The index of the best choice. A tie for the best: None under ties="wrong" (Okapi puts the
    true TruthfulQA MC1 answer first, so breaking ties by order would reward a model that cannot
    tell the choices apart), the first of them under "first" (lm-evaluation-harness's argmax)."""
    best = max(scores)
    winners = [i for i, s in enumerate(scores) if s == best]
    return winners[0] if ties == "first" or len(winners) == 1 else None


def mc2_score(lls, true_mask) -> float:
    """TruthfulQA MC2: the true answers' share of the choices' likelihoods, normalised to sum 1."""
    probs = torch.tensor(lls, dtype=torch.float64).softmax(0)
    return float(probs[torch.tensor(true_mask)].sum())


# --- Readers for the original release files -------------------------------------------------------

class BadRow(Exception):
    """One malformed row; read_rows turns it into `{path}: {where}: {problem}`."""


class BadRows:
    """Malformed rows stop the run with one line naming the file, the row and the field, or, with
    --skip-bad, are counted per file (a row of a file read for several languages counts once)."""

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.found: dict[str, dict[str, str]] = {}          # file -> where -> message

    def __call__(self, path, where: str, problem) -> None:
        message = f"{path}: {where}: {problem}"
        if not self.skip:
            raise ValueError(f"{message} (fix the row, or pass --skip-bad to skip malformed rows)")
        self.found.setdefault(str(path), {}).setdefault(where, message)

    def count(self, path) -> int:
        return len(self.found.get(str(path), {}))


def is_strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def checked(row, key: str, ok: Callable, expected: str, name: str | None = None):
    """row[key] if ok(row[key]), else a BadRow naming the field, its value and what was expected."""
    value = row.get(key) if isinstance(row, dict) else None
    if not ok(value):
        shown = repr(value) if isinstance(row, dict) and key in row else "missing"
        raise BadRow(f"field {name or repr(key)} is {shown}; expected {expected}")
    return value


def text_of(row, key: str, name: str | None = None) -> str:
    return checked(row, key, lambda v: isinstance(v, str) and v.strip(), "a non-empty string", name)


def one_of(row, key: str, allowed: tuple):
    return checked(row, key, lambda v: v in allowed, "one of " + "/".join(map(str, allowed)))


def read_rows(path: Path, rows, bad: BadRows, parse: Callable[[dict], dict | None]) -> list[dict]:
    """parse(row) of each (where, row), "id" defaulting to `where`; None for another language's
    row. A BadRow, raised by parse or yielded in place of a row, goes to `bad`."""
    out = []
    for where, row in rows:
        try:
            if isinstance(row, BadRow):
                raise row
            parsed = parse(row)
        except BadRow as e:
            bad(path, where, e)
            continue
        if parsed is not None:
            out.append(parsed if parsed.get("id") is not None else {**parsed, "id": where})
    return out


def read_text(path: Path) -> str:
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8-sig") as f:
        return f.read()


def parse_json(path: Path, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def json_rows(path: Path):
    """(where, row) of a JSON array (where = "record N", from 0) or a JSON Lines file ("line N"). A
    bad JSON Lines line arrives as a BadRow; an array that does not parse stops the run."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        yield from ((f"record {n}", row) for n, row in enumerate(parse_json(path, text)))
        return
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield f"line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {n}", BadRow(f"not valid JSON ({e.msg})")


def tsv_rows(path: Path, need: tuple[str, ...]):
    """(where, {column: field}) of a tab-separated file whose header names `need` among its
    columns. A line with another number of fields (a stray tab shifts the rest) is a BadRow."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)   # unbalanced quotes
        header = next(reader, [])
        missing = [c for c in need if c not in header]
        if missing:
            raise ValueError(f"{path}: line 1: the header lacks column(s) {missing}; expected the "
                             f"release's header line, naming {', '.join(need)} among its columns")
        for fields in reader:
            where = f"line {reader.line_num}"
            if len(fields) != len(header):
                yield where, BadRow(f"{len(fields)} tab-separated fields; expected {len(header)}, "
                                    "as in the header")
            else:
                yield where, dict(zip(header, fields))


def squad_rows(path: Path):
    """(where, question + its paragraph's "context") of SQuAD v1.1 json; an article or paragraph
    whose questions cannot be reached is one BadRow."""
    doc = parse_json(path, read_text(path))
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise ValueError(f"{path}: top-level field 'data' is missing or not a list; expected SQuAD "
                         'v1.1 json ({"data": [{"paragraphs": [{"context", "qas"}]}]})')
    for i, article in enumerate(data):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            yield f"data[{i}]", BadRow("field 'paragraphs' is missing or not a list")
            continue
        for j, paragraph in enumerate(paragraphs):
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(qas, list):
                yield f"data[{i}].paragraphs[{j}]", BadRow("field 'qas' is missing or not a list")
                continue
            for k, qa in enumerate(qas):
                row = {**qa, "context": paragraph.get("context")} if isinstance(qa, dict) else qa
                yield f"data[{i}].paragraphs[{j}].qas[{k}]", row


def read_squad(path: Path, lang: str, bad: BadRows) -> list[dict]:
    """XQuAD / MLQA (SQuAD v1.1 json) -> [{id, context, question, answers}]."""
    def parse(qa):
        answers = checked(qa, "answers", lambda v: isinstance(v, list) and v,
                          "a non-empty list of {'text', 'answer_start'}")
        return dict(id=text_of(qa, "id"), context=text_of(qa, "context"),
                    question=text_of(qa, "question"), answers=[text_of(a, "text") for a in answers])
    return read_rows(path, squad_rows(path), bad, parse)


def read_mkqa(path: Path, lang: str, bad: BadRows) -> list[dict]:
    """MKQA jsonl(.gz) -> [{id, question, answers}] for `lang`; answers: every answer's text and
    aliases, "" for one without text (unanswerable, long_answer), as the official script does."""
    key = MKQA_KEY[lang]

    def by_language(row, field):
        return checked(row, field, lambda v: isinstance(v, dict), "an object keyed by language")

    def parse(row):
        example_id = checked(row, "example_id", lambda v: v is not None, "an id")
        question = text_of(by_language(row, "queries"), key, f"'queries.{key}'")
        entries = checked(by_language(row, "answers"), key, lambda v: isinstance(v, list) and v,
                          "a non-empty list of answers", f"'answers.{key}'")
        golds = []
        for a in entries:
            checked(a, "type", lambda v: isinstance(v, str), "a string", f"'answers.{key}[].type'")
            text = checked(a, "text", lambda v: v is None or isinstance(v, str), "a string or null",
                           f"'answers.{key}[].text'")
            aliases = checked(a, "aliases", lambda v: v is None or is_strings(v),
                              "a list of strings", f"'answers.{key}[].aliases'")
            golds += [text or ""] + (aliases or [])
        return dict(id=str(example_id), question=question, answers=list(dict.fromkeys(golds)))
    return read_rows(path, json_rows(path), bad, parse)


def read_truthfulqa(path: Path, lang: str, bad: BadRows) -> list[dict]:
    """Okapi TruthfulQA -> [{id, question, mc1_choices, mc1_labels, mc2_choices, mc2_labels}]."""
    def parse(row):
        out = {"question": text_of(row, "question")}
        for part in ("mc1", "mc2"):
            choices = checked(row, f"{part}_targets_choices",
                              lambda v: is_strings(v) and len(v) >= 2 and all(c.strip() for c in v),
                              "a list of >= 2 non-empty strings")
            labels = checked(row, f"{part}_targets_labels",
                             lambda v: isinstance(v, list) and len(v) == len(choices)
                             and all(x in (0, 1) for x in v), f"{len(choices)} labels of 0/1")
            if sum(labels) == 0 or (part == "mc1" and sum(labels) != 1):
                raise BadRow(f"field '{part}_targets_labels' has {sum(labels)} true answers; "
                             "expected " + ("exactly one" if part == "mc1" else "at least one"))
            out |= {f"{part}_choices": choices, f"{part}_labels": labels}
        return out
    return read_rows(path, json_rows(path), bad, parse)


def read_mmlu(path: Path, lang: str, bad: BadRows) -> list[dict]:
    """Okapi MMLU -> [{id, question, options (A-D), answer (0-3)}]."""
    def parse(row):
        return dict(id=row.get("id"), question=text_of(row, "instruction"),
                    options=[text_of(row, f"option_{c.lower()}") for c in MMLU_LETTERS],
                    answer=MMLU_LETTERS.index(one_of(row, "answer", MMLU_LETTERS)))
    return read_rows(path, json_rows(path), bad, parse)


XNLI_COLUMNS = ("language", "gold_label", "sentence1", "sentence2", "pairID")


def read_xnli(path: Path, lang: str, bad: BadRows) -> list[dict]:
    """XNLI-1.0 xnli.test.tsv (all languages) -> `lang`'s [{id, premise, hypothesis, label 0-2}]."""
    def parse(row):
        if row["language"] != lang:
            return None
        return dict(id=row["pairID"], premise=text_of(row, "sentence1"),
                    hypothesis=text_of(row, "sentence2"),
                    label=XNLI_LABELS.index(one_of(row, "gold_label", XNLI_LABELS)))
    return read_rows(path, tsv_rows(path, XNLI_COLUMNS), bad, parse)


def read_xcopa(path: Path, lang: str, bad: BadRows) -> list[dict]:
    """XCOPA test.{lang}.jsonl -> [{id, premise, choice1, choice2, question, label}]."""
    def parse(row):
        return dict(id=row.get("idx"), premise=text_of(row, "premise"),
                    choice1=text_of(row, "choice1"), choice2=text_of(row, "choice2"),
                    question=one_of(row, "question", ("cause", "effect")),
                    label=one_of(row, "label", (0, 1)))
    return read_rows(path, json_rows(path), bad, parse)


STORYCLOZE_COLUMNS = ("InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3",
                      "InputSentence4", "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2",
                      "AnswerRightEnding")


def read_xstorycloze(path: Path, lang: str, bad: BadRows) -> list[dict]:
    """XStoryCloze (StoryCloze's 8 columns) -> [{id, sentences (4), endings (2), label (0/1)}]."""
    def parse(row):
        return dict(id=row["InputStoryid"],
                    sentences=[text_of(row, f"InputSentence{i}") for i in range(1, 5)],
                    endings=[text_of(row, f"RandomFifthSentenceQuiz{i}") for i in (1, 2)],
                    label=int(one_of(row, "AnswerRightEnding", ("1", "2"))) - 1)
    return read_rows(path, tsv_rows(path, STORYCLOZE_COLUMNS), bad, parse)


# --- From rows to prompts -------------------------------------------------------------------------

@dataclass
class MCItem:
    id: str | int                        # the release's id of the example, else where it is
    context: str
    choices: list[str]
    gold: int                            # index of the correct choice (acc, acc_norm, MC1)
    true_mask: list[bool] | None = None  # TruthfulQA MC2: which choices are true

    def continuations(self) -> list[str]:
        # lm-evaluation-harness's target delimiter, " " in every format used here
        return [" " + c for c in self.choices]


@dataclass
class QAItem:
    id: str | int
    prompt: str
    answers: list[str]


def squad_item(row: dict, lang: str) -> QAItem:
    # x-LLM strips context, question and answers before use.
    text = QA_INPUT[lang].format(context=row["context"].strip(), question=row["question"].strip())
    return QAItem(row["id"], format_prompt(QA_INSTRUCTION[lang], text),
                  [a.strip() for a in row["answers"]])


def mkqa_item(row: dict, lang: str) -> QAItem:
    text = MKQA_INPUT[lang].format(question=row["question"].strip())
    return QAItem(row["id"], format_prompt(MKQA_INSTRUCTION[lang], text), row["answers"])


def okapi_question(text: str) -> str:
    """A TruthfulQA question cleaned up as lm-evaluation-harness's Okapi task: strip, " [title]" ->
    ". ", drop [bracketed] spans, one pass of "  " -> " " (three spaces become two, as there)."""
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ")


def truthfulqa_items(row: dict, lang: str) -> list[MCItem]:
    context = TRUTHFULQA_PREFIX + "\n\nQ: " + okapi_question(row["question"]) + "\nA:"
    mc1 = MCItem(row["id"], context, row["mc1_choices"], row["mc1_labels"].index(1))
    mc2 = MCItem(row["id"], context, row["mc2_choices"], row["mc2_labels"].index(1),
                 [bool(x) for x in row["mc2_labels"]])
    return [mc1, mc2]


def mmlu_item(row: dict, lang: str) -> MCItem:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(MMLU_LETTERS, row["options"]))
    return MCItem(row["id"], row["question"].strip() + options + "\nAnswer:", list(MMLU_LETTERS),
                  row["answer"])


def xnli_item(row: dict, lang: str) -> MCItem:
    question, *label_words = XNLI_WORDS[lang]
    return MCItem(row["id"], f"{row['premise']}, {question}?",
                  [f"{w}, {row['hypothesis']}" for w in label_words], row["label"])


def xcopa_item(row: dict, lang: str) -> MCItem:
    premise = row["premise"].strip()
    # lm-evaluation-harness cuts the last character whatever it is; we cut only punctuation.
    if is_punct(premise[-1]):
        premise = premise[:-1]
    return MCItem(row["id"], f"{premise} {XCOPA_CONNECTORS[lang][row['question']]}",
                  [c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])], row["label"])


def xstorycloze_item(row: dict, lang: str) -> MCItem:
    return MCItem(row["id"], " ".join(row["sentences"]), row["endings"], row["label"])


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str                      # as in the paper's tables
    table: int                      # 1 or 2
    langs: tuple[str, ...]          # languages of ours the release has
    kind: str                       # "qa" (generated answers) | "mc" (log-likelihood)
    metrics: tuple[str, ...]        # the first is the paper's
    prompt: str                     # the prompt format's id, in results.json with the protocol
    split: str                      # the release's split these files hold
    release: str                    # the file under BENCH_DIR, {lang} standing for the language
    read: Callable
    build: Callable

    def file(self, data_dir: Path, lang: str) -> Path:
        """The release file; for a .gz one that is not there, its unpacked copy."""
        path = data_dir / self.release.format(lang=lang)
        return path if path.exists() or path.suffix != ".gz" else path.with_suffix("")


BENCHMARKS = {b.name: b for b in [
    Benchmark("xquad", "XQuAD", 1, LANGS, "qa", ("f1", "em"), "x-llm-alpaca-qa",
              "test (XQuAD's only split)", "xquad/xquad.{lang}.json", read_squad, squad_item),
    Benchmark("mlqa", "MLQA", 1, LANGS, "qa", ("f1", "em"), "x-llm-alpaca-qa",
              "test (MLQA_V1/test, not dev)", "mlqa/test-context-{lang}-question-{lang}.json",
              read_squad, squad_item),
    Benchmark("truthfulqa", "TruthfulQA", 1, LANGS, "mc", ("mc1", "mc2"),
              "okapi-truthfulqa-qa-prompt", "validation (Okapi's only TruthfulQA split)",
              "truthfulqa/{lang}_validation.json", read_truthfulqa, truthfulqa_items),
    Benchmark("mkqa", "MKQA", 1, LANGS, "qa", ("f1", "em"), "alpaca-closed-book-qa",
              "all (MKQA has one split)", "mkqa/mkqa.jsonl.gz", read_mkqa, mkqa_item),
    Benchmark("xnli", "XNLI", 2, LANGS, "mc", ("acc", "acc_norm"), "lm-eval-xnli",
              "test (not dev)", "xnli/xnli.test.tsv", read_xnli, xnli_item),
    Benchmark("xcopa", "XCOPA", 2, ("vi", "zh"), "mc", ("acc", "acc_norm"), "lm-eval-xcopa",
              "test (not val)", "xcopa/test.{lang}.jsonl", read_xcopa, xcopa_item),
    Benchmark("xstorycloze", "XStoryCloze", 2, ("ar", "zh"), "mc", ("acc", "acc_norm"),
              "lm-eval-xstorycloze", "eval (split_20_80_eval, not train)",
              "xstorycloze/spring2016.val.{lang}.tsv.split_20_80_eval.tsv", read_xstorycloze,
              xstorycloze_item),
    Benchmark("mmlu", "MMLU", 2, LANGS, "mc", ("acc", "acc_norm"), "lm-eval-okapi-mmlu-letters",
              "test (Okapi's, not val or dev)", "mmlu/{lang}_test.json", read_mmlu, mmlu_item),
]}


# --- Scoring with the model -----------------------------------------------------------------------

def model_device(model) -> torch.device:
    return model.tok_embeddings.weight.device


def split_continuation(tok, context_ids: list[int], context: str,
                       continuation: str) -> tuple[list[int], bool]:
    """Ids of `continuation` read off the joint encoding (alone, " A" would get SentencePiece's
    dummy-prefix "▁"), whose prefix must be `context_ids`; a piece straddling the boundary (never
    after a space) makes it encoded alone, and the flag says so."""
    whole = tok.encode(context + continuation, bos=True)
    if len(whole) > len(context_ids) and whole[:len(context_ids)] == context_ids:
        return whole[len(context_ids):], False
    return tok.encode(continuation, bos=False), True


def pack_scored(sequences: list[list[int]], firsts: list[int], pad_id: int, device):
    """A right-padded batch scored from position `first` on. tokens, mask [B, T]: each sequence
    but its last id (only a target); rows, cols, targets [M]: (row, col) predicts target."""
    T = max(len(s) for s in sequences) - 1
    tokens = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    rows, cols, targets = [], [], []
    for b, (seq, first) in enumerate(zip(sequences, firsts)):
        n = len(seq) - 1
        tokens[b, :n] = torch.tensor(seq[:-1])
        mask[b, :n] = 1
        rows += [b] * (n - first)
        cols += range(first, n)
        targets += seq[first + 1:]
    rows, cols, targets = (torch.tensor(x, device=device) for x in (rows, cols, targets))
    return tokens.to(device), mask.to(device), rows, cols, targets


def fit_prompt(ids: list[int], room: int, notes: Counter, bos: bool,
               what: str = "prompts") -> list[int]:
    """Left-truncate a prompt to `room` tokens, keeping its BOS if the model has one (as
    lm-evaluation-harness keeps a context's end)."""
    if len(ids) <= room:
        return ids
    notes[f"{what} truncated on the left"] += 1
    return ids[:bos] + ids[len(ids) - room + bos:]


@torch.inference_mode()
def loglikelihoods(model, tok, requests: list[tuple[str, str]], notes: Counter,
                   batch_size: int = 16, desc: str | None = None) -> list[float]:
    """Summed log P(continuation | context) of each request; each context tokenised once, each
    distinct request scored once. Only continuation positions go through the head: no [B, T, V]."""
    max_len = model.args.max_seq_len
    encode_context = functools.cache(lambda context: tok.encode(context, bos=True))
    unique: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for context, continuation in requests:
        if (context, continuation) in unique:
            continue
        ctx = encode_context(context)
        cont, alone = split_continuation(tok, ctx, context, continuation)
        notes["continuations encoded alone"] += alone
        room = max_len + 1 - len(cont)          # the continuation's last id is only a target
        if len(ctx) > room and room < 2:
            raise SystemExit(f"error: {desc or 'scoring'}: the choice {continuation[:60]!r} has "
                             f"{len(cont)} tokens, more than the model's context of {max_len}; "
                             "leave this task out of --tasks")
        ctx = fit_prompt(ctx, room, notes, tok.bos_id is not None, "contexts")
        unique[(context, continuation)] = (ctx, cont)
    keys = sorted(unique, key=lambda k: -sum(map(len, unique[k])))
    scores: dict[tuple[str, str], float] = {}
    device = model_device(model)
    for start in tqdm(range(0, len(keys), batch_size), desc=desc, leave=False,
                      disable=desc is None):
        chunk = keys[start:start + batch_size]
        # the last context position predicts the continuation's first token
        tokens, mask, rows, cols, targets = pack_scored(
            [unique[k][0] + unique[k][1] for k in chunk], [len(unique[k][0]) - 1 for k in chunk],
            tok.pad_id, device)
        h = model.hidden_at(tokens, model.args.n_layers, attention_mask=mask)     # [B, T, D]
        logp = model.head_logits(h[rows, cols][None])[0].log_softmax(-1)          # [M, V] fp32
        token_lp = logp.gather(1, targets[:, None])[:, 0].double()                # [M]
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=device)
        sums.index_add_(0, rows, token_lp)
        scores.update(zip(chunk, sums.tolist()))
    return [scores[r] for r in requests]


def item_loglikelihoods(model, tok, items: list[MCItem], batch_size: int, desc: str,
                        notes: Counter):
    """Per item, the summed log-likelihood of each choice (one batched pass over all items)."""
    requests = [(it.context, c) for it in items for c in it.continuations()]
    flat = iter(loglikelihoods(model, tok, requests, notes, batch_size, desc))
    return [[next(flat) for _ in it.choices] for it in items]


@functools.lru_cache(maxsize=4)
def newline_token_ids(tok) -> frozenset[int]:
    """Ids whose text contains a newline (a "\\n" piece, the <0x0A> byte, ":\\n", ...)."""
    return frozenset(i for i in range(tok.vocab_size) if "\n" in tok.decode([i]))


@torch.inference_mode()
def greedy_generate(model, tok, prompts: list[list[int]], max_new_tokens: int,
                    batch_size: int = 16, stop_at_newline: bool = True,
                    desc: str | None = None) -> list[list[int]]:
    """Greedy continuation ids of each prompt (BOS included), EOS excluded; length-sorted batches,
    left-padded so every row's next token is in the last column, decoded through the KV cache. A
    row stops at EOS, after `max_new_tokens`, or (stop_at_newline) at a newline after the first
    non-blank text: a model that opens with a newline still gets to answer."""
    stops = newline_token_ids(tok) if stop_at_newline else frozenset()
    device = model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False,
                      disable=desc is None):
        idx = order[start:start + batch_size]
        B, T0 = len(idx), max(len(prompts[i]) for i in idx)
        left = {i: T0 - len(prompts[i]) for i in idx}                   # padding on the left
        tokens = torch.tensor([[tok.pad_id] * left[i] + prompts[i] for i in idx], device=device)
        mask = torch.tensor([[0] * left[i] + [1] * len(prompts[i]) for i in idx], device=device)
        cache = model.init_cache(B, T0 + max_new_tokens)
        logits = model(tokens, attention_mask=mask, cache=cache, last_only=True)[:, -1]  # [B, V]
        done = [False] * B
        for step in range(max_new_tokens):
            next_ids = logits.argmax(-1)                                                # [B]
            for b, t in enumerate(next_ids.tolist()):
                if done[b] or t == tok.eos_id:
                    done[b] = True
                    continue
                out[idx[b]].append(t)
                if t in stops and "\n" in tok.decode(out[idx[b]]).lstrip():
                    done[b] = True
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            logits = model(next_ids[:, None], attention_mask=mask, cache=cache,
                           last_only=True)[:, -1]
    return out


QA_STOPS = {   # --qa-stop: where a generated answer ends
    "newline": "EOS or the first newline after the answer began; the first line",
    "eos": "EOS only (as x-LLM's scripts); the whole generation",
}
MC_TIES = {    # --mc-ties: what a tie for the best log-likelihood scores
    "wrong": "a tie for the best is wrong",
    "first": "a tie goes to the first best choice (lm-evaluation-harness)",
}


@dataclass(frozen=True)
class Protocol:
    """How answers are produced and picked; `describe` is results.json's "prompt"."""
    qa_max_new_tokens: int = 64
    qa_stop: str = "newline"         # a key of QA_STOPS
    mc_ties: str = "wrong"           # a key of MC_TIES

    def describe(self, bench: Benchmark) -> str:
        if bench.kind == "qa":
            return (f"{bench.prompt}; greedy, max {self.qa_max_new_tokens} new tokens, "
                    f"stop {self.qa_stop}")
        return f"{bench.prompt}; log-likelihood, ties {self.mc_ties}"


def answer_text(generation: str, qa_stop: str) -> str:
    """The answer in a generation: its first non-blank line (--qa-stop newline), or all of it."""
    text = generation.strip()
    return text.split("\n")[0].strip() if qa_stop == "newline" else text


def prompt_room(model, max_new_tokens: int) -> int:
    room = model.args.max_seq_len - max_new_tokens
    if room < 2:
        raise SystemExit(f"error: --qa-max-new-tokens {max_new_tokens} leaves no room for a prompt "
                         f"in the model's context of {model.args.max_seq_len} tokens; pass fewer")
    return room


def percent(values) -> float:
    values = [float(v) for v in values]
    return 100 * sum(values) / len(values)


def evaluate_cell(model, tok, bench: Benchmark, lang: str, rows: list[dict], protocol: Protocol,
                  batch_size: int, notes: Counter) -> tuple[dict[str, float], list[dict]]:
    """Metric -> value in [0, 100], the mean of a per-example value in the records (the lines of the
    predictions file). QA: {id, prompt, generation, answer, gold, f1, em}. Multiple choice: {id,
    prompt, choices, ll (log P(" " + choice | prompt)), length (the choice's characters), gold,
    pick (acc), pick_norm (acc_norm: ll / length)}, a pick null on a tie under --mc-ties wrong.
    TruthfulQA: {id, prompt, mc1: {choices, ll, gold, pick}, mc2: {choices, ll, true, score}}."""
    desc = f"{bench.name}/{lang}"
    items = [bench.build(r, lang) for r in rows]
    if bench.kind == "qa":
        room = prompt_room(model, protocol.qa_max_new_tokens)
        prompts = [fit_prompt(tok.encode(it.prompt, bos=True), room, notes, tok.bos_id is not None)
                   for it in items]
        generated = greedy_generate(model, tok, prompts, protocol.qa_max_new_tokens, batch_size,
                                    stop_at_newline=protocol.qa_stop == "newline", desc=desc)
        f1_of = mkqa_f1 if bench.name == "mkqa" else qa_f1
        records = []
        for it, ids in zip(items, generated):
            generation = tok.decode(ids)
            answer = answer_text(generation, protocol.qa_stop)
            records.append(dict(id=it.id, prompt=it.prompt, generation=generation, answer=answer,
                                gold=it.answers, f1=f1_of(answer, it.answers, lang),
                                em=qa_em(answer, it.answers, lang)))
        return {m: percent(r[m] for r in records) for m in bench.metrics}, records

    ties = protocol.mc_ties
    if bench.name == "truthfulqa":                          # items: (MC1, MC2) pairs
        lls = item_loglikelihoods(model, tok, [it for pair in items for it in pair], batch_size,
                                  desc, notes)
        records = []
        for (mc1, mc2), ll1, ll2 in zip(items, lls[0::2], lls[1::2]):
            records.append(dict(
                id=mc1.id, prompt=mc1.context,
                mc1=dict(choices=mc1.choices, ll=ll1, gold=mc1.gold, pick=pick_choice(ll1, ties)),
                mc2=dict(choices=mc2.choices, ll=ll2, true=mc2.true_mask,
                         score=mc2_score(ll2, mc2.true_mask))))
        return {"mc1": percent(r["mc1"]["pick"] == r["mc1"]["gold"] for r in records),
                "mc2": percent(r["mc2"]["score"] for r in records)}, records

    records = []
    for it, ll in zip(items, item_loglikelihoods(model, tok, items, batch_size, desc, notes)):
        # acc_norm: per character of the choice, delimiter excluded, as lm-evaluation-harness
        length = [len(c) for c in it.choices]
        records.append(dict(id=it.id, prompt=it.context, choices=it.choices, ll=ll, length=length,
                            gold=it.gold, pick=pick_choice(ll, ties),
                            pick_norm=pick_choice([x / n for x, n in zip(ll, length)], ties)))
    return {"acc": percent(r["pick"] == r["gold"] for r in records),
            "acc_norm": percent(r["pick_norm"] == r["gold"] for r in records)}, records


# --- The paper's numbers (its Tables 1 and 2, transcribed) and the report -------------------------

# The paper's columns, in its order, which BENCHMARKS follows: (task, lang) for each release's lang.
PAPER_COLUMNS = {table: [(b.name, lang) for b in BENCHMARKS.values() if b.table == table
                         for lang in b.langs] for table in (1, 2)}
UNREADABLE = "?"
PAPER_MODEL = {"llama": "LLaMA-2-7B", "gemma2": "Gemma-2-2B"}
PAPER_ROWS = {   # family -> table -> method -> one value per column of PAPER_COLUMNS[table]
    "llama": {
        1: {"TFT": (27.36, 21.23, 23.41, 28.80, 21.62, 23.86, 28.54, 27.04, 26.40,
                    38.59, 35.02, 40.70),
            "DFT-logits": (29.65, 27.57, 24.77, 31.54, 28.26, 25.68, 28.64, 28.81, 28.93,
                           39.64, 35.84, 40.87),
            "DFT-feature": (28.27, 26.35, 24.34, 32.19, 29.51, 25.29, 30.45, 28.98, 27.79,
                            UNREADABLE, UNREADABLE, UNREADABLE)},
        2: {"SFT": (36.59, 35.38, 36.39, 63.00, 65.00, 49.70, 59.56, 29.37, 27.60, 30.49),
            "TFT": (44.14, 33.73, 36.87, 66.00, 65.00, 57.51, 64.06, 33.23, 28.05, 32.34),
            "DFT-logits": (43.37, 34.06, 36.94, 66.20, 66.40, 58.78, 64.93, 32.60, 29.06, 33.19),
            "DFT-feature": (43.50, 34.38, 37.64, 66.60, 68.60, 58.78, 64.40, 32.19, 28.86, 32.82)},
    },
    "gemma2": {
        1: {"DFT-logits": (21.23, 25.79, 17.37, 24.36, 27.51, 20.13, 27.34, 26.78, 27.16,
                           38.54, 34.81, 40.84)},
        2: {"SFT": (41.33, 35.62, 40.36, 68.60, 70.40, 61.02, 68.23, 36.07, 31.16, 36.22),
            "TFT": (43.05, 33.94, 36.63, 67.00, 70.40, 61.48, 64.88, 36.95, 32.71, 36.37),
            "DFT-logits": (43.29, 35.14, 38.46, 68.40, 70.60, 62.08, 66.91, 36.89, 31.84, 35.30),
            "DFT-feature": (43.25, 36.73, 39.74, 67.20, 70.20, 61.88, 66.25, 36.70, 31.63, 34.43)},
    },
}
TABLE_TITLES = {1: "Table 1: F1 (XQuAD, MLQA, MKQA) and MC1 accuracy (TruthfulQA)",
                2: "Table 2: accuracy (XNLI, XCOPA, XStoryCloze, MMLU)"}
NO_LANGUAGE, MISSING = "–", "missing"             # what a table shows for a cell without numbers


@dataclass
class Cell:                             # one benchmark in one language
    state: str                          # "ok", NO_LANGUAGE or MISSING
    path: Path | None = None            # the release file read (or expected)
    rows: list[dict] | None = None      # the examples scored
    skipped: int = 0                    # malformed rows of its file skipped under --skip-bad
    not_comparable: str = ""            # a key of NOT_COMPARABLE: not the benchmark's numbers


NOT_COMPARABLE = {   # why a cell's numbers cannot be set beside the paper's: a label, what to do
    "bundled": ("bundled sample", "its few rows are a format check, not a measurement: pass "
                "--data-dir BENCH_DIR with the original release files"),
    "limit": ("--limit subset", "only the first examples of each file were scored: run without "
              "--limit"),
}


def caveat(cells) -> str:
    """"bundled sample (3–5 rows) — not comparable", or "" when all `cells` are comparable."""
    flagged = [c for c in cells if c.not_comparable]
    if not flagged:
        return ""
    low, high = min(len(c.rows) for c in flagged), max(len(c.rows) for c in flagged)
    rows = f"{low}–{high} rows" if low != high else f"{low} row" + "s" * (low != 1)
    return f"{NOT_COMPARABLE[flagged[0].not_comparable][0]} ({rows}) — not comparable"


def table_row(*cells) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def table_head(*columns: str) -> list[str]:
    return [table_row(*columns), "|---" * len(columns) + "|"]


def results_markdown(results: list[dict], cells: dict[tuple[str, str], Cell], tasks: list[str],
                     langs: list[str], family: str, model_name: str, header_lines: list[str],
                     notes: list[str]) -> str:
    """results.md, where numbers not comparable to the paper's carry their caveat wherever shown."""
    ours = {(r["task"], r["lang"], r["metric"]): r["value"] for r in results}
    protocols = {(r["task"], r["lang"]): r["prompt"] for r in results}
    lines = [f"# Zero-shot evaluation: {model_name}", ""] + header_lines + [""]
    for table in (1, 2):
        benches = [BENCHMARKS[t] for t in tasks if BENCHMARKS[t].table == table]
        if not benches:
            continue
        columns = [(b, lang) for b in benches for lang in langs]
        label = caveat(cells[(b.name, lang)] for b, lang in columns)
        lines += [f"## {TABLE_TITLES[table]}" + (f" — ours: {label}" if label else ""), ""]
        lines += table_head("model", "method", *(f"{b.title} {lang}" for b, lang in columns))
        for method, values in PAPER_ROWS.get(family, {}).get(table, {}).items():
            paper = dict(zip(PAPER_COLUMNS[table], values))
            shown = [paper.get((b.name, lang), NO_LANGUAGE) for b, lang in columns]
            lines.append(table_row(f"{PAPER_MODEL[family]} (paper)", method,
                                   *(v if isinstance(v, str) else f"{v:.2f}" for v in shown)))
        shown = [f"{ours[(b.name, lang, b.metrics[0])]:.2f}" if cells[(b.name, lang)].state == "ok"
                 else cells[(b.name, lang)].state for b, lang in columns]
        lines += [table_row("ours", model_name + (f" — {label}" if label else ""), *shown), ""]
    lines += ["## All metrics", ""]
    lines += table_head("task", "lang", "metric", "value", "n", "comparable to the paper")
    lines += [table_row(r["task"], r["lang"], r["metric"], f"{r['value']:.2f}", r["n"],
                        r["caveat"] or "yes") for r in results]
    lines += ["", "## What was read", ""]
    lines += table_head("task", "lang", "file", "split", "rows scored", "rows skipped as bad",
                        "protocol")
    for (task, lang), cell in cells.items():
        if cell.state != NO_LANGUAGE:
            scored = (caveat([cell]) or len(cell.rows)) if cell.state == "ok" else MISSING
            lines.append(table_row(task, lang, f"`{cell.path}`", BENCHMARKS[task].split, scored,
                                   cell.skipped, protocols.get((task, lang), "")))
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# --- The logit lens: what each layer would predict if the model stopped there; i, j read off it ---

LENS_LANGS = ("vi", "ar", "zh", "en")        # the bundled sample's languages
# I: our reading of "the entropy drops": a drop is clear from this share of the curve's range over
# layers 1..N on; a curve whose range is under LENS_FLAT nats has none (its steps are noise).
LENS_CLEAR_DROP = 0.1
LENS_FLAT = 0.05
LENS_SHOWN = 8          # response positions of the first example whose top-1 tokens are shown


@dataclass
class LensSequence:
    ids: list[int]      # BOS + Alpaca prompt + response as trained; no EOS, no word of the language
    first: int          # the prompt's last position, whose next token is the response's first


@dataclass
class LensResult:
    layers: list[dict]          # k = 0..N: {"layer", "entropy", "rank", "prob", "top1"}, means
    positions: int              # response positions averaged over (all sequences together)
    shown_targets: list[int]    # the first sequence's true next tokens at its shown positions
    shown_top1: list[list[int]]  # [layer][position]: the lens's top-1 token there


def lens_records(path: Path, n: int, tok: Tokenizer) -> list[dict]:
    """The first `n` records of an Alpaca-format JSON list, each checked for this tokenizer."""
    expected = "a JSON list of {instruction, input, output}"
    if not path.is_file():
        raise SystemExit(f"error: {path}: not found; pass --lens-data FILE.json, {expected} (or "
                         "--lens-lang one of " + "/".join(LENS_LANGS) + ")")
    records = read_records(path)[:n]
    if not records:
        raise SystemExit(f"error: {path}: the JSON list is empty; expected {expected}")
    for index, record in enumerate(records):
        defect = record_defect(record, sentencepiece=tok.sp is not None)
        if defect is not None:
            raise SystemExit(f"error: {path}: record {index}: {defect[1]} (fix it or pass another "
                             "--lens-data)")
    return records


def lens_sequences(tok, records: list[dict], max_len: int) -> tuple[list[LensSequence], list[str]]:
    """The records encoded as prepare_data.py does; one too long loses its response's end."""
    sequences, notes = [], []
    for index, r in enumerate(records):
        prompt = alpaca_prompt_ids(tok, r["instruction"], r["input"])
        full = prompt + tok.encode(r["output"], bos=False)
        ids = full[:max_len + 1]           # the model reads all but the last id, only a target
        if len(ids) <= len(prompt):
            notes.append(f"record {index}: its prompt alone fills max_seq_len={max_len}; left out")
            continue
        if len(ids) < len(full):
            notes.append(f"record {index}: response cut to fit max_seq_len={max_len}")
        sequences.append(LensSequence(ids, len(prompt) - 1))
    return sequences, notes


@torch.inference_mode()
def logit_lens(model, sequences: list[LensSequence], pad_id: int, batch_size: int = 16,
               chunk_size: int = 128, show: int = LENS_SHOWN,
               desc: str | None = None) -> LensResult:
    """Per layer k = 0..N (0 = embeddings), softmax(head_logits(h_k)) averaged over all response
    positions: entropy (nats), rank of the true next token (1 = top; a tie counts against it), its
    probability, top-1 hit rate; and the top-1 tokens at the first sequence's first `show`
    response positions. The head sees `chunk_size` positions at a time: never [T, V] per layer."""
    device = model_device(model)
    n_layers = model.args.n_layers
    sums = torch.zeros(n_layers + 1, 4, dtype=torch.float64)  # entropy, rank, prob, top-1 hits
    shown = min(show, len(sequences[0].ids) - 1 - sequences[0].first)
    shown_top1: list[list[int]] = [[] for _ in range(n_layers + 1)]
    n_positions = 0
    batches = range(0, len(sequences), batch_size)
    bar = tqdm(total=len(batches) * (n_layers + 1), desc=desc, unit="layer", leave=False,
               disable=desc is None)
    for start in batches:
        chunk = sequences[start:start + batch_size]
        tokens, mask, rows, cols, targets = pack_scored(
            [s.ids for s in chunk], [s.first for s in chunk], pad_id, device)
        states = model.hidden_at(tokens, tuple(range(n_layers + 1)), attention_mask=mask)
        for k, h in enumerate(states):
            h = h[rows, cols]                                                  # [M, D]
            for a in range(0, len(h), chunk_size):
                logits = model.head_logits(h[None, a:a + chunk_size])[0]      # [C, V] fp32
                logp = logits.log_softmax(-1)                                  # [C, V]
                target = targets[a:a + chunk_size, None]                       # [C, 1]
                top1 = logits.argmax(-1)                                       # [C]
                entropy = -(logp.exp() * logp).sum(-1)                         # [C]
                # ranked on the logits: fp32 log-normalising could round two apart into a tie
                rank = (logits > logits.gather(1, target)).sum(-1) + 1         # [C]
                stats = (entropy, rank, logp.gather(1, target).double().exp(), top1 == target[:, 0])
                sums[k] += torch.stack([x.double().sum() for x in stats]).cpu()
                if start == 0 and a < shown:       # the first sequence's positions come first
                    shown_top1[k] += top1[:shown - a].tolist()
            bar.update(1)
        n_positions += len(targets)
    bar.close()
    layers = [dict(layer=k, entropy=e, rank=r, prob=p, top1=t)
              for k, (e, r, p, t) in enumerate((sums / n_positions).tolist())]
    shown_targets = sequences[0].ids[sequences[0].first + 1:][:shown]
    return LensResult(layers, n_positions, shown_targets, shown_top1)


def lens_windows(n_layers: int) -> tuple[range, range]:
    """Layers 2..N//3 for i, the next ones up to 2N//3 for j: 32 -> 2..10, 11..21; 4 -> 2, 3."""
    first_end = min(n_layers, max(2, n_layers // 3))
    middle_end = min(n_layers, max(first_end + 1, 2 * n_layers // 3))
    return range(2, first_end + 1), range(first_end + 1, middle_end + 1)


def suggest_layers(entropy: list[float], family: str) -> tuple[int, int, list[str]]:
    """(i, j, notes) read off the entropy curve, `entropy[k - 1]` being layer k's (k = 1..N). I: our
    rule for the paper's reading by eye ("drops near layer 2 and ~15" on LLaMA-2-7B). The drop at
    k is H(k-1) - H(k), so k is the first state after the fall (k = 0, the embeddings, reads the
    input token, not the model's view of it). i, j: the largest clear drop in lens_windows' two
    windows (the earlier on a tie), else default_layers' with a note; both defaults if that
    leaves no 1 <= i < j <= N."""
    n_layers = len(entropy)
    default_i, default_j = default_layers(n_layers, family)
    height = max(entropy) - min(entropy)
    drop = {k: entropy[k - 2] - entropy[k - 1] for k in range(2, n_layers + 1)}
    notes = []
    if height < LENS_FLAT:
        notes.append(f"flat entropy curve (range {height:.3f} < {LENS_FLAT} nats): no drop to read")
    picks = []
    for name, window, default in zip("ij", lens_windows(n_layers), (default_i, default_j)):
        clear = [k for k in window
                 if height >= LENS_FLAT and drop[k] > 0 and drop[k] >= LENS_CLEAR_DROP * height]
        if clear:
            picks.append(max(clear, key=lambda k: (drop[k], -k)))
        else:
            where = (f"layers {window.start}..{window.stop - 1}" if len(window)
                     else "an empty window (too few layers)")
            notes.append(f"{name}: no clear entropy drop in {where}; using default_layers' "
                         f"{name} = {default}")
            picks.append(default)
    i, j = picks
    if not 1 <= i < j <= n_layers:
        notes.append(f"i = {i}, j = {j} is not 1 <= i < j <= {n_layers}; using default_layers' "
                     f"({default_i}, {default_j})")
        i, j = default_i, default_j
    return i, j, notes


def _cell(text: str) -> str:
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


def lens_markdown(result: LensResult, first_example: dict, i: int, j: int, rule_notes: list[str],
                  header: list[str], notes: list[str]) -> str:
    """Per-layer table, the suggested layers, the first example's top-1 tokens per layer."""
    lines = ["# Logit lens", ""] + header + [""]
    lines += table_head("layer", "entropy (nats)", "drop H(k-1) - H(k)", "rank of true next token",
                        "P(true next token)", "top-1")
    for row in result.layers:
        k = row["layer"]
        label = {0: "0 (embeddings)", i: f"{k} ← i (--lc-layer)",
                 j: f"{k} ← j (--et-layer)"}.get(k, str(k))
        drop = f"{result.layers[k - 1]['entropy'] - row['entropy']:+.3f}" if k > 1 else ""
        lines.append(table_row(label, f"{row['entropy']:.3f}", drop, f"{row['rank']:.1f}",
                               f"{row['prob']:.4f}", f"{100 * row['top1']:.1f}%"))
    how = "default_layers' fallback, see the notes" if rule_notes else "at the two entropy drops"
    lines += ["", f"**Suggested: `--lc-layer {i} --et-layer {j}`** ({how}; the rule: "
              "`evaluate.suggest_layers`).", ""]
    if first_example["targets"]:
        lines += ["## Top-1 token per layer, first example, first response positions", ""]
        lines += table_head("layer", *(f"+{p}" for p in range(len(first_example["targets"]))))
        lines.append(table_row("**true next token**", *map(_cell, first_example["targets"])))
        for k, pieces in enumerate(first_example["top1"]):
            lines.append(table_row(k, *map(_cell, pieces)))
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot_lens(result: LensResult, i: int, j: int, path: Path) -> str:
    """Entropy and mean rank by layer, i and j marked; returns what it did."""
    if Figure is None:
        return "PNG skipped: pip install matplotlib"
    ks = [row["layer"] for row in result.layers]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    for ax, key, title in ((left, "entropy", "entropy of the lens distribution (nats)"),
                           (right, "rank", "mean rank of the true next token")):
        ax.plot(ks, [row[key] for row in result.layers], marker="o", markersize=3)
        for k, name in ((i, "i"), (j, "j")):
            ax.axvline(k, color="grey", linestyle="--", linewidth=0.8)
            ax.text(k, 0.97, f" {name}", transform=ax.get_xaxis_transform(), ha="left", va="top")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (block output; 0 = embeddings)")
        ax.set_title(title, fontsize=10)
    left.ticklabel_format(axis="y", useOffset=False)
    right.set_yscale("log")
    fig.savefig(path, dpi=120)
    return f"wrote {path}"


def run_logit_lens(args) -> Path:
    data = Path(args.lens_data) if args.lens_data else SAMPLE_DIR / f"alpaca_{args.lens_lang}.json"
    tok = load_tokenizer(Path(args.model))
    records = lens_records(data, args.lens_examples, tok)   # before the model loads: fail fast
    out = output_dir(args)
    model, dtype = load_model(args.model, args.device, args.dtype)
    config = model.args
    sequences, notes = lens_sequences(tok, records, config.max_seq_len)
    if not sequences:
        raise SystemExit(f"error: {data}: no record leaves a response position within "
                         f"max_seq_len={config.max_seq_len}; pass shorter records with --lens-data")
    result = logit_lens(model, sequences, tok.pad_id, args.batch_size, desc="logit lens")
    i, j, rule_notes = suggest_layers([row["entropy"] for row in result.layers[1:]], config.family)
    png = plot_lens(result, i, j, out / "logit_lens.png")
    header = [f"Model `{args.model}` (family {config.family}, {config.n_layers} blocks, V = "
              f"{config.vocab_size}, so entropy <= ln V = {math.log(config.vocab_size):.2f} nats), "
              f"device {args.device}, dtype {dtype}.",
              f"Data `{data}` ({args.lens_lang}): {len(sequences)} training sequences (Alpaca "
              f"prompt + response), teacher-forced; means over all {result.positions} response "
              "positions, each predicting the next token. Layer k: block k's output through the "
              f"final norm and output head (k = {config.n_layers}: the model's own output)."]
    # Pieces keep word starts ("▁") and bytes ("<0x0A>") visible.
    first_example = dict(targets=[tok.piece(t) for t in result.shown_targets],
                         top1=[[tok.piece(t) for t in ids] for ids in result.shown_top1])
    md = lens_markdown(result, first_example, i, j, rule_notes, header, rule_notes + notes + [png])
    write_atomic(out / "logit_lens.md", md)
    report = dict(model=args.model, family=config.family, n_layers=config.n_layers,
                  vocab_size=config.vocab_size, data=str(data), lang=args.lens_lang,
                  examples=len(sequences), positions=result.positions, device=args.device,
                  dtype=dtype, layers=result.layers, first_example=first_example, notes=notes,
                  suggested=dict(lc_layer=i, et_layer=j, notes=rule_notes))
    write_atomic(out / "logit_lens.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(md)
    print(f"wrote {out / 'logit_lens.md'} and {out / 'logit_lens.json'}")
    return out


# --- CLI ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    releases = "".join(f"\n  {b.release:<60}{b.title} ({', '.join(b.langs)})"
                       for b in BENCHMARKS.values())
    p = argparse.ArgumentParser(description=__doc__, epilog="BENCH_DIR's files:" + releases,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint dir in the HF layout (config.json, "
                   "safetensors, tokenizer.model), e.g. OUT/final (required; no default)")
    p.add_argument("--langs", default=",".join(LANGS),
                   help=f"comma-separated, of {','.join(LANGS)} (default: %(default)s)")
    p.add_argument("--tasks", default="all", help="'all' or comma-separated, of "
                   f"{','.join(BENCHMARKS)} (default: %(default)s)")
    p.add_argument("--data-dir", default=str(BENCH_SAMPLE_DIR), help="BENCH_DIR, the tree below "
                   f"(default: the bundled sample {BENCH_SAMPLE_DIR.relative_to(REPO_DIR)}, 3-5 "
                   "rows per task, its numbers labelled 'not comparable' everywhere)")
    p.add_argument("--out", help="output dir for results.json, results.md, predictions/ and the "
                   "logit lens (default: MODEL/eval)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples of each task and "
                   "language (default: all of them)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="sequences per forward pass (default: %(default)s)")
    p.add_argument("--qa-max-new-tokens", "--max-new-tokens", type=int, help="greedy tokens per "
                   f"generated answer (default: {Protocol.qa_max_new_tokens}; 256 with --prompt)")
    p.add_argument("--qa-stop", choices=tuple(QA_STOPS), default=Protocol.qa_stop,
                   help="where a generated QA answer ends: "
                   + "; ".join(f"{k}: {v}" for k, v in QA_STOPS.items())
                   + " (default: %(default)s)")
    p.add_argument("--mc-ties", choices=tuple(MC_TIES), default=Protocol.mc_ties,
                   help="multiple choice: " + "; ".join(f"{k}: {v}" for k, v in MC_TIES.items())
                   + " (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when present, else cpu; here %(default)s)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 "
                   "on CUDA, fp32 on CPU, where bf16 matmuls are very slow (default: %(default)s)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed benchmark rows, "
                   "counted in results.md (default: off: the first one stops the run)")
    p.add_argument("--prompt", help="only generate a greedy response to this instruction (Alpaca "
                   "template) and print it (default: none; run the benchmarks)")
    lens = p.add_argument_group("logit lens")
    lens.add_argument("--logit-lens", action="store_true", help="only run the logit lens: "
                      "per-layer entropy and suggested --lc-layer/--et-layer in "
                      "OUT/logit_lens.md, .json and .png (default: off; run the benchmarks)")
    lens.add_argument("--lens-data", metavar="FILE.json", help="the target language's Alpaca "
                      f"records (default: {SAMPLE_DIR.relative_to(REPO_DIR)}/alpaca_LANG.json)")
    lens.add_argument("--lens-lang", choices=LENS_LANGS, default="vi", help="the language of the "
                      "records, picking the bundled sample file (default: %(default)s)")
    lens.add_argument("--lens-examples", type=int, default=16, metavar="N",
                      help="first N records (default: %(default)s)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.logit_lens and args.prompt:
        p.error("--logit-lens and --prompt are separate modes; pass one of them")
    if args.qa_max_new_tokens is None:
        args.qa_max_new_tokens = 256 if args.prompt else Protocol.qa_max_new_tokens
    for name in ("batch_size", "qa_max_new_tokens", "limit", "lens_examples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    args.explicit_tasks = args.tasks.strip() != "all"
    if not args.explicit_tasks:
        args.tasks = ",".join(BENCHMARKS)
    for name, known in (("langs", LANGS), ("tasks", BENCHMARKS)):
        names = [x.strip() for x in getattr(args, name).split(",") if x.strip()]
        unknown = [x for x in names if x not in known]
        if unknown or not names:
            p.error(f"--{name}: unknown {unknown}; expected some of {','.join(known)}")
        setattr(args, name, names)
    return args


def load_model(path: str, device: str, dtype: str) -> tuple[Transformer, str]:
    """The model in eval mode, and its dtype's name (bfloat16, float32)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible; pass --device cpu")
    torch_dtype = torch.bfloat16 if resolve_dtype(dtype, device.type) == "bf16" else torch.float32
    try:
        model = Transformer.from_pretrained(path, dtype=torch_dtype, device=device)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    return model.eval(), str(torch_dtype).removeprefix("torch.")


def output_dir(args) -> Path:
    """--out (default MODEL/eval), shown writable before any model loads."""
    out = Path(args.out) if args.out else Path(args.model) / "eval"
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise SystemExit(f"error: --out {out}: cannot write there ({e.strerror or e}); pass a "
                         "writable directory") from None
    return out


def run_prompt(args) -> None:
    tok = load_tokenizer(Path(args.model))
    model, _ = load_model(args.model, args.device, args.dtype)
    ids = fit_prompt(alpaca_prompt_ids(tok, args.prompt),
                     prompt_room(model, args.qa_max_new_tokens), Counter(), tok.bos_id is not None)
    generated = greedy_generate(model, tok, [ids], args.qa_max_new_tokens, stop_at_newline=False)
    print(tok.decode(generated[0]).strip())


def plan_cells(args) -> tuple[dict[tuple[str, str], Cell], list[str]]:
    """The cells by (task, lang) and notes, every file read before the model loads (fail fast)."""
    data_dir = Path(args.data_dir)
    bad = BadRows(args.skip_bad)
    bundled = data_dir.resolve() == BENCH_SAMPLE_DIR.resolve()
    cells, notes = {}, []
    for task in args.tasks:
        bench = BENCHMARKS[task]
        for lang in args.langs:
            if lang not in bench.langs:
                cells[(task, lang)] = Cell(NO_LANGUAGE)
                continue
            path = bench.file(data_dir, lang)
            rows = []
            if path.is_file():
                try:
                    rows = bench.read(path, lang, bad)
                except ValueError as e:
                    raise SystemExit(f"error: {e}") from None
                problem = f"{task}/{lang}: {path} has no usable rows for {lang}"
            else:
                problem = (f"{task}/{lang}: {path} not found; expected the original {bench.title} "
                           "release file there")
            if not rows:
                if args.explicit_tasks:
                    raise SystemExit(f"error: {problem} (or leave {task} out of --tasks)")
                print(f"note: {problem}; skipping this cell", file=sys.stderr)
                notes.append(problem)
                cells[(task, lang)] = Cell(MISSING, path)
                continue
            kept = rows[:args.limit]                                # all of them without --limit
            why = "bundled" if bundled else "limit" if len(kept) < len(rows) else ""
            cells[(task, lang)] = Cell("ok", path, kept, not_comparable=why)
    for cell in cells.values():
        cell.skipped = bad.count(cell.path)
    for path, found in bad.found.items():
        notes.append(f"--skip-bad: skipped {len(found)} malformed row(s) of {path}; first: "
                     f"{next(iter(found.values()))}")
        print(f"note: skipped {len(found)} malformed row(s) of {path}", file=sys.stderr)
    return cells, notes


def score_cells(model, tok, cells: dict[tuple[str, str], Cell], protocol: Protocol,
                batch_size: int, out: Path) -> tuple[list[dict], Counter]:
    """results.json's rows and counts of what was cut or encoded apart. The predictions are
    written aside and replace OUT/predictions only when every cell is done: that folder never
    holds an earlier run's files (its other tasks or languages), nor a mix after a kill."""
    staging = out / ".predictions.partial"
    shutil.rmtree(staging, ignore_errors=True)              # what a killed run left
    staging.mkdir()
    counters, results = Counter(), []
    try:
        for (task, lang), cell in cells.items():
            if cell.state != "ok":
                continue
            bench = BENCHMARKS[task]
            metrics, records = evaluate_cell(model, tok, bench, lang, cell.rows, protocol,
                                             batch_size, counters)
            (staging / f"{task}.{lang}.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                encoding="utf-8")
            label = caveat([cell])
            for metric in bench.metrics:
                results.append(dict(task=task, lang=lang, metric=metric,
                                    value=round(metrics[metric], 4), n=len(cell.rows),
                                    prompt=protocol.describe(bench), file=str(cell.path),
                                    comparable=not label, caveat=label))
            print(f"{task}/{lang}: " + ", ".join(f"{m} {metrics[m]:.2f}" for m in bench.metrics)
                  + f" (n={len(cell.rows)})" + (f" — {label}" if label else ""))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, out / "predictions")
    return results, counters


def run_benchmarks(args) -> Path:
    cells, notes = plan_cells(args)
    if all(cell.state != "ok" for cell in cells.values()):
        raise SystemExit(f"error: nothing to evaluate: no benchmark file for tasks {args.tasks} "
                         f"and languages {args.langs} under {args.data_dir}")
    out = output_dir(args)
    tok = load_tokenizer(Path(args.model))
    model, dtype = load_model(args.model, args.device, args.dtype)
    protocol = Protocol(args.qa_max_new_tokens, args.qa_stop, args.mc_ties)
    results, counters = score_cells(model, tok, cells, protocol, args.batch_size, out)
    notes += [f"protocol: stop {protocol.qa_stop}: {QA_STOPS[protocol.qa_stop]} (--qa-stop); "
              f"ties {protocol.mc_ties}: {MC_TIES[protocol.mc_ties]} (--mc-ties)"]
    notes += [f"{name}: {count}" for name, count in counters.items() if count]
    notes += [f"{task}/{lang}: the benchmark has no {lang} release ({NO_LANGUAGE} in the table)"
              for (task, lang), cell in cells.items() if cell.state == NO_LANGUAGE]
    family = model.args.family
    header = [f"Model `{args.model}` (family {family}; paper rows: "
              f"{PAPER_MODEL.get(family, '-')}), device {args.device}, dtype {dtype}, data "
              f"`{args.data_dir}`, batch size {args.batch_size}"
              + (f", --limit {args.limit}" if args.limit else "")
              + ". Zero-shot; values in %. Per-example outputs: `predictions/`."]
    label = caveat(cells.values())
    if label:       # one reason per run: the bundled sample's, else --limit's
        fix = next(NOT_COMPARABLE[c.not_comparable][1] for c in cells.values() if c.not_comparable)
        header.append(f"**{label}: {fix}.**")
    md = results_markdown(results, cells, args.tasks, args.langs, family,
                          Path(args.model).name or "model", header, notes)
    write_atomic(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out / "results.md", md)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'predictions'}/")
    if label:
        print(f"note: all numbers above: {label}; {fix}")
    return out


def main(argv=None):
    args = parse_args(argv)
    run = run_prompt if args.prompt else run_logit_lens if args.logit_lens else run_benchmarks
    run(args)


if __name__ == "__main__":
    main()
