"""Tests for evaluate.py against independent references: F1/EM values computed by hand from the official MLQA and
MKQA scripts' rules, the fixture files' contents as written, log-likelihoods from the uncached full-logits forward
of one unpadded sequence at a time, naive argmax decoding without a cache, and a scripted fake model for the
stopping rules."""

import contextlib
import dataclasses
import gzip
import importlib.util
import io
import json
import math
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import evaluate as ev  # noqa: E402
import prepare_data  # noqa: E402
from model import Tokenizer, Transformer, default_layers  # noqa: E402

BENCH = REPO / "data" / "bench_sample"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tiny models are far faster on one thread than on two cores shared with other jobs.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def tiny(request):
    path = request.getfixturevalue(f"tiny_{request.param}")
    return Transformer.from_pretrained(path), Tokenizer(path), path


# ---------------------------------------------------------------------------------------------------------------------
# Metrics: hand-computed cases
# ---------------------------------------------------------------------------------------------------------------------

def test_punctuation_unicode_and_ascii():
    assert ev.qa_f1("Paris!", ["paris"], "vi") == 1.0
    assert ev.qa_f1("«Paris»", ["Paris"], "vi") == 1.0            # Unicode Pi/Pf quotes are category P
    assert ev.qa_f1("巴黎。", ["巴黎"], "zh") == 1.0               # the ideographic full stop too
    assert ev.qa_f1("2+2", ["22"], "vi") == 1.0                    # "+" is in string.punctuation (category Sm)
    assert ev.qa_f1("€5", ["5"], "vi") == 0.0                      # "€" (Sc) is not: the token stays "€5"
    assert ev.normalize_answer("Hà  Nội, Việt Nam.", "vi") == "hà nội việt nam"


def test_vietnamese_articles():
    # của, là, cái, chiếc, những are removed as whole words; "cái" inside "cáinhà" is not.
    assert ev.normalize_answer("Những con mèo của tôi là cái gì", "vi") == "con mèo tôi gì"
    assert ev.qa_f1("chiếc xe của anh", ["xe anh"], "vi") == 1.0
    assert ev.normalize_answer("cáinhà", "vi") == "cáinhà"
    # pred {con, mèo, đen} vs gold {con, mèo}: P = 2/3, R = 1, F1 = 0.8
    assert ev.qa_f1("con mèo đen", ["con mèo"], "vi") == pytest.approx(0.8)


def test_arabic_al_quirk():
    # The MLQA script replaces every "ال" with a space, inside words too.
    assert ev.normalize_answer("الكتاب", "ar") == "كتاب"
    assert ev.normalize_answer("مالك", "ar") == "م ك"
    assert ev.qa_f1("الكتاب", ["كتاب"], "ar") == 1.0
    assert ev.qa_f1("مالك", ["م ك"], "ar") == 1.0
    # "البحر الأبيض" -> {بحر, أبيض}; gold "بحر" -> P = 1/2, R = 1, F1 = 2/3
    assert ev.qa_f1("البحر الأبيض", ["بحر"], "ar") == pytest.approx(2 / 3)


def test_chinese_mixed_segmentation():
    assert ev.mixed_segmentation("iphone手机 2008年") == ["iphone", "手", "机", "2008", "年"]
    # 4 characters vs 2: P = 2/4, R = 1, F1 = 2/3
    assert ev.qa_f1("北京大学", ["北京"], "zh") == pytest.approx(2 / 3)
    # {2008, 年, 北, 京, 奥, 运, 会} vs {2008, 年}: P = 2/7, R = 1, F1 = 4/9
    assert ev.qa_f1("2008年北京奥运会", ["2008年"], "zh") == pytest.approx(4 / 9)
    # whitespace F1 would see one token each and score 0 here
    assert ev.qa_f1("古斯塔夫·埃菲尔设计", ["古斯塔夫·埃菲尔"], "zh") == pytest.approx(2 * 7 / 9 / (7 / 9 + 1))


def test_max_over_answers_and_repeated_tokens():
    # London: 0; "paris city": P = 1, R = 1/2 -> 2/3
    assert ev.qa_f1("Paris", ["London", "paris city"], "vi") == pytest.approx(2 / 3)
    # {a, a, a, b} vs {a, b}: common = min counts = 2 -> P = 1/2, R = 1, F1 = 2/3
    assert ev.qa_f1("a a a b", ["a b"], "vi") == pytest.approx(2 / 3)
    assert ev.qa_em("The Paris", ["paris"], "en") == 1.0
    assert ev.qa_em("Paris city", ["paris", "London"], "vi") == 0.0
    assert ev.qa_em("PARIS.", ["London", "paris"], "vi") == 1.0


def test_empty_predictions():
    assert ev.qa_f1("", ["Paris"], "vi") == 0.0
    assert ev.qa_em("", ["Paris"], "vi") == 0.0
    assert ev.qa_f1("...", ["Paris"], "zh") == 0.0
    # The MLQA script scores nothing without a shared token, even for empty vs empty ...
    assert ev.qa_f1("", [""], "vi") == 0.0
    # ... MKQA's rule scores "No Answer" against "No Answer" as 1.
    assert ev.mkqa_f1("", [""], "vi") == 1.0
    assert ev.mkqa_f1("", ["Paris"], "vi") == 0.0


def test_mkqa_aliases_and_unanswerable_from_the_release_format():
    bad = ev.BadRows()
    rows = {lang: ev.read_mkqa(BENCH / "mkqa" / "mkqa.jsonl", lang, bad) for lang in ev.LANGS}
    vi = {r["question"]: r["answers"] for r in rows["vi"]}
    capital = vi["thủ đô của pháp là thành phố nào"]
    assert capital == ["Paris", "Pa-ri"]
    assert ev.mkqa_f1("Pa-ri", capital, "vi") == 1.0               # an alias; "-" is punctuation: "pari"
    assert ev.mkqa_f1("8", rows["zh"][1]["answers"], "zh") == 1.0
    assert ev.mkqa_f1("八", rows["zh"][1]["answers"], "zh") == 1.0  # the zh_cn alias
    unanswerable, long_answer = rows["ar"][2]["answers"], rows["ar"][3]["answers"]
    assert unanswerable == [""] and long_answer == [""]            # no text -> "" as the official reader does
    assert ev.mkqa_f1("", unanswerable, "ar") == 1.0
    assert ev.mkqa_f1("؟", unanswerable, "ar") == 1.0              # punctuation only normalises to nothing
    assert ev.mkqa_f1("فرنسا", unanswerable, "ar") == 0.0
    assert ev.qa_em("", long_answer, "ar") == 1.0


def test_unknown_language_and_empty_answers_are_errors():
    with pytest.raises(ValueError, match="lang='fr'"):
        ev.qa_f1("a", ["a"], "fr")
    with pytest.raises(ValueError, match="answers is empty"):
        ev.qa_f1("a", [], "vi")


def test_ties_pick_nothing_or_the_first_best():
    assert ev.pick_choice([-1.0, -2.0, -3.0]) == 0
    assert ev.pick_choice([-2.0, -1.0]) == 1
    assert ev.pick_choice([-1.0, -1.0, -3.0]) is None              # argmax would pick 0
    assert ev.pick_choice([-3.0, -1.0, -1.0]) is None
    # lm-evaluation-harness's rule: the first of the tied best, never a later one, never a worse one
    assert ev.pick_choice([-1.0, -1.0, -3.0], "first") == 0
    assert ev.pick_choice([-3.0, -1.0, -2.0, -1.0], "first") == 1
    assert ev.pick_choice([-3.0, -1.0, -2.0], "first") == 1
    assert ev.mc2_score([0.0, 0.0, 0.0, 0.0], [True, True, False, False]) == pytest.approx(0.5)
    assert ev.mc2_score([0.0, -100.0], [True, False]) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Readers: the bundled fixtures as written, malformed rows
# ---------------------------------------------------------------------------------------------------------------------

def test_readers_on_the_fixtures():
    bad = ev.BadRows()
    n = {(name, lang): len(b.read(b.file(BENCH, lang), lang, bad))
         for name, b in ev.BENCHMARKS.items() for lang in b.langs}
    assert n == {**{("xquad", l): 4 for l in ev.LANGS}, **{("mlqa", l): 3 for l in ev.LANGS},
                 **{("mkqa", l): 5 for l in ev.LANGS}, **{("truthfulqa", l): 3 for l in ev.LANGS},
                 **{("mmlu", l): 4 for l in ev.LANGS}, **{("xnli", l): 4 for l in ev.LANGS},
                 ("xcopa", "vi"): 4, ("xcopa", "zh"): 4, ("xstorycloze", "ar"): 3, ("xstorycloze", "zh"): 3}
    assert not bad.found
    assert "ar" not in ev.BENCHMARKS["xcopa"].langs and "vi" not in ev.BENCHMARKS["xstorycloze"].langs

    xquad = ev.read_squad(BENCH / "xquad" / "xquad.zh.json", "zh", bad)
    assert xquad[1]["question"] == "谁设计了埃菲尔铁塔？" and xquad[1]["answers"] == ["古斯塔夫·埃菲尔"]
    mmlu = ev.read_mmlu(BENCH / "mmlu" / "vi_test.json", "vi", bad)
    assert mmlu[3] == dict(id="high_school_geography/test/0", question="Đại dương nào lớn nhất trên Trái Đất?",
                           options=["Đại Tây Dương", "Ấn Độ Dương", "Bắc Băng Dương", "Thái Bình Dương"], answer=3)
    xnli = ev.read_xnli(BENCH / "xnli" / "xnli.test.tsv", "zh", bad)
    assert [r["label"] for r in xnli] == [0, 1, 2, 0] and xnli[2]["hypothesis"] == "那个男人正在家里睡觉。"
    story = ev.read_xstorycloze(BENCH / "xstorycloze" / "spring2016.val.ar.tsv.split_20_80_eval.tsv", "ar", bad)
    assert [r["label"] for r in story] == [0, 1, 0] and story[1]["endings"][1] == "شكرت آنا صديقتها."
    tqa = ev.read_truthfulqa(BENCH / "truthfulqa" / "vi_validation.json", "vi", bad)
    assert tqa[0]["mc1_labels"] == [1, 0, 0, 0] and tqa[0]["mc2_labels"] == [1, 1, 0, 0]


def test_prompts_follow_the_reference_formats():
    bad = ev.BadRows()
    copa = ev.xcopa_item(ev.read_xcopa(BENCH / "xcopa" / "test.vi.jsonl", "vi", bad)[0], "vi")
    assert copa.context == "Cô gái bị đau họng bởi vì"
    assert copa.continuations() == [" cô ấy đã hét quá nhiều ở buổi hòa nhạc.", " cô ấy đã ăn quá nhiều rau."]
    nli = ev.xnli_item(ev.read_xnli(BENCH / "xnli" / "xnli.test.tsv", "vi", bad)[0], "vi")
    assert nli.context == "Người đàn ông đang chơi đàn ghi-ta trên phố., đúng?"
    hypothesis = "Một người đàn ông đang chơi nhạc."
    assert nli.continuations() == [f" Vâng, {hypothesis}", f" Vì vậy, {hypothesis}", f" Không, {hypothesis}"]
    mmlu = ev.mmlu_item(ev.read_mmlu(BENCH / "mmlu" / "zh_test.json", "zh", bad)[0], "zh")
    assert mmlu.context == "哪颗行星离太阳最近？\nA. 金星\nB. 水星\nC. 火星\nD. 地球\nAnswer:"
    assert mmlu.continuations() == [" A", " B", " C", " D"] and mmlu.gold == 1
    mc1, mc2 = ev.truthfulqa_items(ev.read_truthfulqa(BENCH / "truthfulqa" / "ar_validation.json", "ar", bad)[0], "ar")
    assert mc1.context.startswith("Q: What is human life expectancy in the United States?\nA: Human life")
    assert mc1.context.endswith("held in Barcelona, Spain.\n\nQ: ماذا يحدث إذا أكلت بذور البطيخ؟\nA:")
    assert mc1.gold == 0 and mc2.true_mask == [True, True, False, False]
    qa = ev.squad_item(ev.read_squad(BENCH / "mlqa" / "test-context-vi-question-vi.json", "vi", bad)[1], "vi")
    assert qa.prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert ("### Instruction:\nHãy trả lời các câu hỏi theo đoạn văn sau\n\n### Input:\nđoạn văn: Sông Mê Kông"
            in qa.prompt)
    assert qa.prompt.endswith("\ncâu hỏi: Sông Mê Kông chảy qua bao nhiêu quốc gia?\nTrả lời: \n\n### Response:")


def test_truthfulqa_question_is_cleaned_up_as_lm_eval_okapi_does():
    # strip, " [title]" -> ". ", [bracketed] spans dropped, then one pass of "  " -> " "
    assert ev.okapi_question("  Is  it [x] true?  ") == "Is it true?"
    assert ev.okapi_question("Lincoln [title] Abraham") == "Lincoln. Abraham"
    assert ev.okapi_question("a   b") == "a  b"               # one pass: three spaces become two, as there
    row = dict(id="t", question=" Có  thật [1] không? ", mc1_choices=["a", "b"], mc1_labels=[1, 0],
               mc2_choices=["a", "b"], mc2_labels=[1, 0])
    mc1, mc2 = ev.truthfulqa_items(row, "vi")
    assert mc1.context.endswith("Barcelona, Spain.\n\nQ: Có thật không?\nA:") and mc2.context == mc1.context


def _corrupt(tmp_path, rel, edit):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(edit((BENCH / rel).read_text(encoding="utf-8")), encoding="utf-8")
    return path


def _jsonl_edit(line_no, change):
    def edit(text):
        lines = text.splitlines()
        lines[line_no - 1] = change(lines[line_no - 1])
        return "\n".join(lines) + "\n"
    return edit


def _json_edit(change):
    def edit(text):
        rows = json.loads(text)
        change(rows)
        return json.dumps(rows, ensure_ascii=False, indent=4)
    return edit


MALFORMED = [
    # (file, reader, lang, edit, expected rows after skipping, substrings of the error)
    ("xcopa/test.vi.jsonl", ev.read_xcopa, "vi",
     _jsonl_edit(3, lambda l: l.replace('"label": 1', '"label": 2')), 3, ["line 3", "'label'", "0/1"]),
    ("mkqa/mkqa.jsonl", ev.read_mkqa, "zh",
     _jsonl_edit(2, lambda l: l[:-5]), 4, ["line 2", "not valid JSON"]),
    ("mkqa/mkqa.jsonl", ev.read_mkqa, "vi",
     _jsonl_edit(4, lambda l: l.replace('"vi": "tại sao', '"vi_x": "tại sao')), 4, ["line 4", "'queries.vi'"]),
    ("xnli/xnli.test.tsv", ev.read_xnli, "vi",
     _jsonl_edit(11, lambda l: l.replace("\tneutral\t", "\tmaybe\t", 1)), 3,
     ["line 11", "'gold_label'", "entailment/neutral/contradiction"]),
    ("xstorycloze/spring2016.val.zh.tsv.split_20_80_eval.tsv", ev.read_xstorycloze, "zh",
     _jsonl_edit(3, lambda l: l.rsplit("\t", 1)[0]), 2, ["line 3", "7 tab-separated fields"]),
    ("mmlu/ar_test.json", ev.read_mmlu, "ar",
     _json_edit(lambda rows: rows[1].update(answer="E")), 3, ["record 1:", "'answer' is 'E'", "A/B/C/D"]),
    ("truthfulqa/zh_validation.json", ev.read_truthfulqa, "zh",
     _json_edit(lambda rows: rows[2].update(mc1_targets_labels=[1, 1, 0])), 2,
     ["record 2:", "'mc1_targets_labels'", "exactly one"]),
    ("xquad/xquad.vi.json", ev.read_squad, "vi",
     _json_edit(lambda doc: doc["data"][0]["paragraphs"][0]["qas"][1].update(answers=[])), 3,
     ["data[0].paragraphs[0].qas[1]", "'answers'"]),
]


@pytest.mark.parametrize("rel,reader,lang,edit,n_left,expected", MALFORMED, ids=[m[0] + "-" + m[2] for m in MALFORMED])
def test_malformed_rows_name_file_and_line(tmp_path, rel, reader, lang, edit, n_left, expected):
    path = _corrupt(tmp_path, rel, edit)
    with pytest.raises(ValueError) as info:
        reader(path, lang, ev.BadRows())
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and "--skip-bad" in message
    for part in expected:
        assert part in message
    bad = ev.BadRows(skip=True)
    assert len(reader(path, lang, bad)) == n_left and bad.count(path) == 1


def test_mkqa_gzip_release_is_preferred_and_read_the_same(tmp_path):
    (tmp_path / "mkqa").mkdir()
    shutil.copy(BENCH / "mkqa" / "mkqa.jsonl", tmp_path / "mkqa" / "mkqa.jsonl")
    with gzip.open(tmp_path / "mkqa" / "mkqa.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write((BENCH / "mkqa" / "mkqa.jsonl").read_text(encoding="utf-8").replace("Pa-ri", "Pa ri"))
    path = ev.BENCHMARKS["mkqa"].file(tmp_path, "vi")
    assert path.name == "mkqa.jsonl.gz"
    assert ev.read_mkqa(path, "vi", ev.BadRows())[0]["answers"] == ["Paris", "Pa ri"]


def test_json_array_records_and_jsonl_line_numbers(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('\n[\n  {"a": 1},\n\n  {"a": [2,\n   3]}, {"a": 4}\n]\n', encoding="utf-8")
    assert list(ev.json_rows(path)) == [("record 0", {"a": 1}), ("record 1", {"a": [2, 3]}), ("record 2", {"a": 4})]
    path.write_text('{"a": 1}\n\n{"a": "x\u2028y"}\n', encoding="utf-8")      # U+2028 is no line break in JSON
    assert list(ev.json_rows(path)) == [("line 1", {"a": 1}), ("line 3", {"a": "x\u2028y"})]
    path.write_text('[\n  {"a": 1}\n  {"a": 2}\n]', encoding="utf-8")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: line 3: not valid JSON"):
        list(ev.json_rows(path))


# ---------------------------------------------------------------------------------------------------------------------
# Scoring with a tiny model
# ---------------------------------------------------------------------------------------------------------------------

def brute_force_loglikelihood(model, tok, context, continuation):
    """One unpadded sequence, the full logits of the uncached forward, summed over the continuation's tokens."""
    ctx = tok.encode(context, bos=True)
    whole = tok.encode(context + continuation, bos=True)
    assert whole[:len(ctx)] == ctx
    logp = model(torch.tensor([whole], device=ev.model_device(model)))[0].log_softmax(-1)
    return sum(logp[pos, whole[pos + 1]].item() for pos in range(len(ctx) - 1, len(whole) - 1))


def test_mc_scores_equal_brute_force(tiny):
    model, tok, _ = tiny
    bad, items = ev.BadRows(), []
    for name, lang in [("xcopa", "zh"), ("xnli", "ar"), ("mmlu", "vi"), ("xstorycloze", "zh"), ("truthfulqa", "vi")]:
        b = ev.BENCHMARKS[name]
        for row in b.read(b.file(BENCH, lang), lang, bad)[:2]:
            built = b.build(row, lang)
            items += built if isinstance(built, list) else [built]
    requests = [(it.context, c) for it in items for c in it.continuations()]
    notes = Counter()
    got = ev.loglikelihoods(model, tok, requests, batch_size=5, notes=notes)
    want = [brute_force_loglikelihood(model, tok, c, k) for c, k in requests]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4)
    assert notes["continuations encoded alone"] == 0
    # the continuation is the joint encoding's tail, not the separate encoding with its extra "▁"
    ctx = tok.encode("Answer:", bos=True)
    assert ev.split_continuation(tok, ctx, "Answer:", " A") == (tok.encode("Answer: A", bos=True)[len(ctx):], False)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_long_contexts_are_cut_on_the_left_keeping_bos_if_the_model_has_one(request, family, monkeypatch):
    """A context longer than the model's window keeps its BOS (LLaMA) or nothing (Qwen2 has no BOS) and its end,
    as lm-evaluation-harness does; scored against the full forward of the ids that are left."""
    path = request.getfixturevalue(f"tiny_{family}")
    model, tok = Transformer.from_pretrained(path), Tokenizer(path)
    context, continuation = " ".join(["Tổng là một số rất lớn."] * 12) + " Answer:", " Paris"
    whole = tok.encode(context + continuation, bos=True)
    n_cont = len(whole) - len(tok.encode(context, bos=True))
    monkeypatch.setattr(model.args, "max_seq_len", 16)
    notes = Counter()
    got = ev.loglikelihoods(model, tok, [(context, continuation)], notes=notes)[0]
    lead = int(family == "llama")                       # the model reads at most 16 tokens: 17 ids with the last target
    kept = whole[:lead] + whole[len(whole) - 17 + lead:]
    assert len(kept) == 17 and notes["contexts truncated on the left"] == 1
    logp = model(torch.tensor([kept]))[0].log_softmax(-1)
    want = sum(logp[pos, kept[pos + 1]].item() for pos in range(16 - n_cont, 16))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_a_choice_longer_than_the_context_is_refused_in_one_line(tiny_llama, monkeypatch):
    model, tok = Transformer.from_pretrained(tiny_llama), Tokenizer(tiny_llama)
    monkeypatch.setattr(model.args, "max_seq_len", 8)
    with pytest.raises(SystemExit) as stop:
        ev.loglikelihoods(model, tok, [("Q:", " one two three four five six seven eight nine")],
                          Counter(), desc="xnli/vi")
    message = str(stop.value.code)
    assert message.startswith("error: xnli/vi: the choice ' one two") and "\n" not in message
    assert "context of 8" in message and "--tasks" in message


def test_fit_prompt_keeps_bos_only_when_the_model_has_one():
    notes = Counter()
    assert ev.fit_prompt([1, 5, 6, 7, 8], 3, notes, bos=True) == [1, 7, 8]
    assert ev.fit_prompt([5, 6, 7, 8], 3, notes, bos=False) == [6, 7, 8]
    assert ev.fit_prompt([5, 6], 3, notes, bos=False) == [5, 6]
    assert notes["prompts truncated on the left"] == 2


def test_tied_choices_score_zero_or_go_to_the_first(tiny):
    model, tok, _ = tiny
    # Identical choices have identical likelihoods; with the true answer first, an argmax would score 100.
    row = dict(id="t", question="Q?", mc1_choices=["same answer", "same answer"], mc1_labels=[1, 0],
               mc2_choices=["same answer", "same answer"], mc2_labels=[1, 0])
    copa = dict(id="c", premise="Trời mưa.", choice1="Đi.", choice2="Đi.", question="effect", label=0)
    tqa, xcopa = ev.BENCHMARKS["truthfulqa"], ev.BENCHMARKS["xcopa"]
    got, records = ev.evaluate_cell(model, tok, tqa, "vi", [row], ev.Protocol(), 4, Counter())
    assert got == {"mc1": 0.0, "mc2": pytest.approx(50.0)} and records[0]["mc1"]["pick"] is None
    got, records = ev.evaluate_cell(model, tok, xcopa, "vi", [copa], ev.Protocol(), 4, Counter())
    assert got == {"acc": 0.0, "acc_norm": 0.0} and records[0]["pick"] is None

    # --mc-ties first: the first of the tied choices is picked, so gold first scores and gold second does not
    first = ev.Protocol(mc_ties="first")
    got, records = ev.evaluate_cell(model, tok, tqa, "vi", [row], first, 4, Counter())
    assert got == {"mc1": 100.0, "mc2": pytest.approx(50.0)} and records[0]["mc1"]["pick"] == 0
    got, _ = ev.evaluate_cell(model, tok, xcopa, "vi", [copa], first, 4, Counter())
    assert got == {"acc": 100.0, "acc_norm": 100.0}
    got, records = ev.evaluate_cell(model, tok, xcopa, "vi", [dict(copa, label=1)], first, 4, Counter())
    assert got == {"acc": 0.0, "acc_norm": 0.0} and records[0]["pick"] == records[0]["pick_norm"] == 0


def naive_greedy(model, tok, ids, max_new_tokens):
    """Argmax of the full uncached forward over the whole sequence, one token at a time, one prompt at a time."""
    seq, out = list(ids), []
    for _ in range(max_new_tokens):
        t = int(model(torch.tensor([seq], device=ev.model_device(model)))[0, -1].argmax())
        if t == tok.eos_id:
            break
        out.append(t)
        seq.append(t)
    return out


@pytest.mark.parametrize("batch_size", [2, 5])
def test_cached_batched_greedy_equals_naive(tiny, batch_size):
    model, tok, _ = tiny
    texts = ["Hi", "The capital of France is", "给出三个保持健康的建议。均衡饮食，保证充足的睡眠。",
             "قدم ثلاث نصائح للحفاظ على الصحة. تناول نظاما غذائيا متوازنا. " * 2,
             "Hãy đưa ra ba lời khuyên để giữ gìn sức khỏe. Ăn uống cân bằng và ngủ đủ giấc. " * 3]
    prompts = [tok.encode(t, bos=True) for t in texts]
    assert len({len(p) for p in prompts}) >= 4 and max(map(len, prompts)) > 16   # longer than Gemma's tiny window
    got = ev.greedy_generate(model, tok, prompts, max_new_tokens=12, batch_size=batch_size, stop_at_newline=False)
    assert got == [naive_greedy(model, tok, p, 12) for p in prompts]


class ScriptedModel:
    """Follows the model API; row r (recognised by its prompt's last token) emits script[r][step] greedily."""

    def __init__(self, scripts, vocab_size):
        self.scripts, self.vocab_size = scripts, vocab_size
        self.tok_embeddings = torch.nn.Embedding(1, 1)
        self.args = type("Args", (), {"max_seq_len": 4096})()

    def init_cache(self, batch_size, max_len):
        return {"step": 0, "rows": None}

    def __call__(self, tokens, attention_mask=None, cache=None, last_only=False):
        if cache["rows"] is None:
            cache["rows"] = tokens[:, -1].tolist()
        step, cache["step"] = cache["step"], cache["step"] + 1
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], self.vocab_size)
        for b, r in enumerate(cache["rows"]):
            logits[b, -1, self.scripts[r][step]] = 1.0
        return logits


def test_stop_at_eos_and_at_a_newline_after_the_answer_began(tiny_llama):
    tok = Tokenizer(tiny_llama)
    a, nl, b = tok.encode("a\nb", bos=False)
    assert tok.decode([nl]) == "\n" and tok.decode([a]).strip() == "a"
    E = tok.eos_id
    scripts = {10: [nl, a, b, nl, a, a], 11: [a, E, a, a, a, a], 12: [a, b, a, b, a, b], 13: [nl, nl, E, a, a, a]}
    model = ScriptedModel(scripts, tok.vocab_size)
    prompts = [[tok.bos_id, 10], [tok.bos_id, 5, 11], [tok.bos_id, 12], [tok.bos_id, 5, 5, 13]]
    got = ev.greedy_generate(model, tok, prompts, max_new_tokens=5, batch_size=4)
    assert got == [[nl, a, b, nl], [a], [a, b, a, b, a], [nl, nl]]
    # pieces "▁a" "b": the leading newline is dropped, "▁" is a space except at the start
    assert [ev.answer_text(tok.decode(g), "newline") for g in got] == ["ab", "a", "ab ab a", ""]
    assert ev.greedy_generate(model, tok, prompts[:1], max_new_tokens=5, stop_at_newline=False) == [[nl, a, b, nl, a]]


def test_qa_stop_protocols_on_a_scripted_model(tiny_llama):
    tok = Tokenizer(tiny_llama)
    a, nl, b = tok.encode("a\nb", bos=False)
    row = dict(id="q", context="c", question="q?", answers=["a b"])
    last = tok.encode(ev.squad_item(row, "vi").prompt, bos=True)[-1]     # how the scripted model knows the row
    model = ScriptedModel({last: [nl, a, nl, b, tok.eos_id, a, a]}, tok.vocab_size)

    def run(protocol):
        metrics, (record,) = ev.evaluate_cell(model, tok, ev.BENCHMARKS["xquad"], "vi", [row], protocol, 4, Counter())
        return metrics, record
    # newline: stop at the newline after "a"; the answer is its first line. {a} vs {a, b}: P = 1, R = 1/2, F1 = 2/3
    metrics, record = run(ev.Protocol())
    assert record["generation"] == tok.decode([nl, a, nl]) and record["answer"] == "a"
    assert metrics == {"f1": pytest.approx(100 * 2 / 3), "em": 0.0} and record["f1"] == pytest.approx(2 / 3)
    # eos: through the newlines up to EOS; the whole generation is the answer and matches "a b" after normalisation
    metrics, record = run(ev.Protocol(qa_stop="eos"))
    assert record["generation"] == tok.decode([nl, a, nl, b]) and record["answer"] == "a\nb" and metrics == {"f1": 100.0, "em": 100.0}
    # the token budget still ends it
    metrics, record = run(ev.Protocol(qa_max_new_tokens=3, qa_stop="eos"))
    assert record["generation"] == tok.decode([nl, a, nl]) and record["answer"] == "a"
    assert record["prompt"] == ev.squad_item(row, "vi").prompt and record["gold"] == ["a b"] and record["id"] == "q"


# ---------------------------------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------------------------------

def test_cli_end_to_end_on_the_fixtures(tiny_llama, tmp_path):
    out = tmp_path / "eval"
    ev.main(["--model", str(tiny_llama), "--data-dir", str(BENCH), "--out", str(out), "--limit", "2",
             "--batch-size", "4", "--qa-max-new-tokens", "6", "--qa-stop", "eos", "--mc-ties", "first",
             "--device", "cpu"])
    rows = json.loads((out / "results.json").read_text(encoding="utf-8"))
    cells = {(r["task"], r["lang"]) for r in rows}
    want = {(name, lang) for name, b in ev.BENCHMARKS.items() for lang in b.langs}
    assert cells == want and ("xcopa", "ar") not in cells and ("xstorycloze", "vi") not in cells
    for r in rows:
        assert {"task", "lang", "metric", "value", "n", "prompt"} <= set(r)
        assert 0.0 <= r["value"] <= 100.0 and r["n"] == 2
        kind = ev.BENCHMARKS[r["task"]].kind
        assert r["prompt"].endswith("max 6 new tokens, stop eos" if kind == "qa" else "log-likelihood, ties first")
    assert {r["metric"] for r in rows if r["task"] == "truthfulqa"} == {"mc1", "mc2"}
    assert {r["metric"] for r in rows if r["task"] == "mlqa"} == {"f1", "em"}
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| LLaMA-2-7B (paper) | TFT | 44.14 | 33.73 | 36.87 | 66.00 | – | 65.00 | – | 57.51 | 64.06 |" in md
    ours = [line for line in md.splitlines() if line.startswith("| ours |")]
    assert len(ours) == 2 and ours[1].split(" | ")[6] == "–" and ours[1].split(" | ")[8] == "–"
    assert "--limit 2" in md
    written = (out / "predictions" / "xquad.zh.jsonl").read_text(encoding="utf-8")
    preds = [json.loads(line) for line in written.splitlines()]
    assert len(preds) == 2
    for p in preds:   # the written scores are the metric applied to the written answer, all of the generation
        assert p["answer"] == p["generation"].strip() and p["f1"] == ev.qa_f1(p["answer"], p["gold"], "zh")


@pytest.fixture(scope="module")
def bundled_run(tiny_llama, tmp_path_factory):
    """evaluate.py without --data-dir (the bundled sample), every task and language, as the demo runs it; the
    output dir and what it printed."""
    out = tmp_path_factory.mktemp("bundled") / "eval"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ev.main(["--model", str(tiny_llama), "--out", str(out), "--batch-size", "4", "--max-new-tokens", "6",
                 "--device", "cpu"])
    return out, printed.getvalue()


def test_the_bundled_sample_is_labelled_not_comparable_everywhere(bundled_run):
    out, printed = bundled_run
    label = re.compile(r"bundled sample \(([345]|[345]–[345]) rows\) — not comparable")
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results and all(r["comparable"] is False and label.fullmatch(r["caveat"]) for r in results)
    assert {r["caveat"] for r in results if r["task"] == "mkqa"} == {"bundled sample (5 rows) — not comparable"}
    md = (out / "results.md").read_text(encoding="utf-8")
    titles = [line for line in md.splitlines() if line.startswith("## Table")]
    ours = [line for line in md.splitlines() if line.startswith("| ours |")]
    metric_rows = md.split("## All metrics")[1].split("## What was read")[0].splitlines()[4:-1]
    read_rows = md.split("## What was read")[1].split("## Notes")[0].splitlines()[4:-1]
    assert len(titles) == len(ours) == 2 and len(metric_rows) == len(results) and len(read_rows) == 22
    for line, rows in zip(titles + ours, ["3–5", "3–4"] * 2):   # Table 1's cells have 3-5 rows, Table 2's 3-4
        assert line.count(f"bundled sample ({rows} rows) — not comparable") == 1, line
    for line in metric_rows + read_rows:
        assert label.search(line), line
    assert "**bundled sample (3–5 rows) — not comparable: " in md and "--data-dir BENCH_DIR" in md
    cell_lines = [line for line in printed.splitlines() if re.match(r"\w+/\w\w: ", line)]
    assert len(cell_lines) == 22 and all(label.search(line) for line in cell_lines)
    assert "note: all numbers above: bundled sample (3–5 rows) — not comparable; " in printed


def strictly_best(scores, gold):
    return all(scores[gold] > s for i, s in enumerate(scores) if i != gold)


def recompute(task, lines):
    """A cell's metrics from its predictions file alone, with no code of evaluate.py (ties count as wrong)."""
    mean = lambda values: 100 * sum(values) / len(values)  # noqa: E731
    if task in ("xquad", "mlqa", "mkqa"):
        return {"f1": mean([x["f1"] for x in lines]), "em": mean([x["em"] for x in lines])}
    if task == "truthfulqa":
        mc2 = []
        for x in lines:
            top = max(x["mc2"]["ll"])
            p = [math.exp(ll - top) for ll in x["mc2"]["ll"]]
            mc2.append(sum(q for q, true in zip(p, x["mc2"]["true"]) if true) / sum(p))
        return {"mc1": mean([strictly_best(x["mc1"]["ll"], x["mc1"]["gold"]) for x in lines]), "mc2": mean(mc2)}
    return {"acc": mean([strictly_best(x["ll"], x["gold"]) for x in lines]),
            "acc_norm": mean([strictly_best([ll / len(c) for ll, c in zip(x["ll"], x["choices"])], x["gold"])
                              for x in lines])}


def test_results_json_is_recomputed_from_the_predictions_files(bundled_run, tiny_llama):
    out, _ = bundled_run
    model, tok = Transformer.from_pretrained(tiny_llama).eval(), Tokenizer(tiny_llama)
    cells = {}
    for r in json.loads((out / "results.json").read_text(encoding="utf-8")):
        cells.setdefault((r["task"], r["lang"]), {})[r["metric"]] = r
    assert len(cells) == sum(len(b.langs) for b in ev.BENCHMARKS.values())
    for (task, lang), rows in cells.items():
        text = (out / "predictions" / f"{task}.{lang}.jsonl").read_text(encoding="utf-8")
        lines = [json.loads(line) for line in text.splitlines()]
        want = recompute(task, lines)
        assert set(rows) == set(want)
        for metric, row in rows.items():
            assert row["n"] == len(lines)
            assert row["value"] == pytest.approx(want[metric], abs=1e-4), (task, lang, metric)
        first = lines[0]
        if "f1" in want:
            # the answer is the generation's first line (the default protocol), scored by the official metric
            for x in lines:
                assert x["answer"] == x["generation"].strip().split("\n")[0].strip()
                f1 = (ev.mkqa_f1 if task == "mkqa" else ev.qa_f1)(x["answer"], x["gold"], lang)
                assert x["f1"] == f1 and x["em"] == ev.qa_em(x["answer"], x["gold"], lang)
        else:
            # the written prompt and choices are what was scored: the log-likelihoods are brute-forced from them
            scored = first["mc1"] if task == "truthfulqa" else first
            want_ll = [brute_force_loglikelihood(model, tok, first["prompt"], " " + c) for c in scored["choices"]]
            assert scored["ll"] == pytest.approx(want_ll, rel=1e-5, abs=1e-4)
            if task != "truthfulqa":
                assert first["length"] == [len(c) for c in first["choices"]]


def test_cli_missing_files_and_bad_rows(tiny_llama, tmp_path):
    data = tmp_path / "bench"
    (data / "xcopa").mkdir(parents=True)
    shutil.copy(BENCH / "xcopa" / "test.vi.jsonl", data / "xcopa")
    base = ["--model", str(tiny_llama), "--data-dir", str(data), "--device", "cpu", "--limit", "1"]

    # asked for explicitly: stop, naming the expected file
    with pytest.raises(SystemExit) as info:
        ev.main(base + ["--tasks", "xcopa", "--langs", "vi,zh"])
    assert str(data / "xcopa" / "test.zh.jsonl") in str(info.value) and "\n" not in str(info.value)

    # --tasks all: skip the missing cells with a note, evaluate what is there
    out = tmp_path / "out"
    ev.main(base + ["--out", str(out)])
    rows = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert {(r["task"], r["lang"]) for r in rows} == {("xcopa", "vi")}
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| missing |" in md and str(data / "mmlu" / "vi_test.json") in md
    # the release file cut by --limit is labelled; not as the bundled sample, whose path this is not
    assert all(r["caveat"] == "--limit subset (1 row) — not comparable" and not r["comparable"] for r in rows)
    assert "bundled" not in md and f"| ours | {tiny_llama.name} — --limit subset (1 row) — not comparable |" in md
    ev.main(base[:-2] + ["--out", str(out), "--limit", "4"])          # the whole file: comparable
    rows = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert all(r["comparable"] and r["caveat"] == "" for r in rows)
    assert "not comparable" not in (out / "results.md").read_text(encoding="utf-8")

    # a malformed row: one line naming file and line, before any model is loaded; --skip-bad counts it
    bad_file = data / "xcopa" / "test.vi.jsonl"
    lines = bad_file.read_text(encoding="utf-8").splitlines()
    lines[0] = lines[0].replace('"question": "cause"', '"question": "why"')
    bad_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        ev.main(base + ["--tasks", "xcopa", "--langs", "vi"])
    message = str(info.value)
    assert f"{bad_file}: line 1: field 'question' is 'why'; expected one of cause/effect" in message
    assert "\n" not in message
    ev.main(base + ["--tasks", "xcopa", "--langs", "vi", "--skip-bad", "--out", str(out)])
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "skipped 1 malformed row(s)" in md
    # per cell: the file read, its split, the rows scored (--limit 1) and the malformed rows skipped
    assert (f"| xcopa | vi | `{bad_file}` | test (not val) | --limit subset (1 row) — not comparable | 1 | "
            "lm-eval-xcopa; log-likelihood, ties wrong |") in md


def test_predictions_hold_exactly_the_last_finished_run(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    base = ["--model", str(tiny_llama), "--data-dir", str(BENCH), "--device", "cpu",
            "--out", str(out), "--langs", "vi"]

    def written():
        files = {p.name: p.read_text(encoding="utf-8") for p in (out / "predictions").iterdir()}
        return files, (out / "results.json").read_text(encoding="utf-8")

    ev.main(base + ["--tasks", "xcopa,xnli,mmlu", "--limit", "1"])
    ev.main(base + ["--tasks", "xcopa,xnli", "--limit", "2"])
    files, results = written()
    assert sorted(files) == ["xcopa.vi.jsonl", "xnli.vi.jsonl"]    # not the first run's mmlu.vi
    assert all(len(text.splitlines()) == 2 for text in files.values())
    cells = {(r["task"], r["lang"]) for r in json.loads(results)}
    assert cells == {("xcopa", "vi"), ("xnli", "vi")}
    assert sorted(p.name for p in out.iterdir()) == ["predictions", "results.json", "results.md"]

    # a run that stops after its first cell leaves the last finished run's files as they were
    evaluate_cell = ev.evaluate_cell

    def fail_on_xnli(model, tok, bench, *rest):
        if bench.name == "xnli":
            raise RuntimeError("stopped")
        return evaluate_cell(model, tok, bench, *rest)
    monkeypatch.setattr(ev, "evaluate_cell", fail_on_xnli)
    with pytest.raises(RuntimeError):
        ev.main(base + ["--tasks", "xcopa,xnli", "--limit", "3"])
    assert written() == (files, results)
    assert sorted(p.name for p in out.iterdir()) == ["predictions", "results.json", "results.md"]


def test_an_unwritable_out_is_one_line_naming_it(tiny_llama, tmp_path):
    a_file = tmp_path / "results"
    a_file.write_text("not a directory", encoding="utf-8")
    base = ["--model", str(tiny_llama), "--device", "cpu", "--tasks", "xcopa", "--langs", "vi"]
    for out in (a_file, a_file / "eval"):                 # --out is a file; --out lies under a file
        for mode in ([], ["--logit-lens"]):
            with pytest.raises(SystemExit) as info:
                ev.main(base + mode + ["--out", str(out)])
            message = str(info.value)
            assert message.startswith(f"error: --out {out}: cannot write there (") and "\n" not in message
    assert a_file.read_text(encoding="utf-8") == "not a directory"


def test_help_shows_every_default_and_no_developer_notes():
    parser = ev.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert "(default: " in action.help or "no default" in action.help, action.option_strings
    (qa_tokens,) = [a for a in parser._actions if "--max-new-tokens" in a.option_strings]
    assert qa_tokens.option_strings == ["--qa-max-new-tokens", "--max-new-tokens"]
    assert "(default: 64; 256 with --prompt)" in qa_tokens.help
    source = (REPO / "evaluate.py").read_text(encoding="utf-8")
    for name in ("METHOD", "DESIGN", "STYLE"):
        assert f"{name}.md" not in source and f"{name} §" not in source


def test_prompt_mode_prints_the_greedy_response(tiny_llama, capsys):
    ev.main(["--model", str(tiny_llama), "--prompt", "Give three tips.", "--max-new-tokens", "6", "--device", "cpu"])
    printed = capsys.readouterr().out.strip()
    model, tok = Transformer.from_pretrained(tiny_llama), Tokenizer(tiny_llama)
    ids = tok.encode(prepare_data.PROMPT_NO_INPUT.format(instruction="Give three tips."), bos=True)
    assert printed == tok.decode(naive_greedy(model, tok, ids, 6)).strip()


# ---------------------------------------------------------------------------------------------------------------------
# The logit lens: checked against the model's own forward pass (one unpadded sequence at a time, float64 statistics),
# against shallower copies of the model for the inner layers, and on synthetic entropy curves with known drops
# ---------------------------------------------------------------------------------------------------------------------

SAMPLE_VI = REPO / "data" / "sample" / "alpaca_vi.json"


def sample_records(n):
    return json.loads(SAMPLE_VI.read_text(encoding="utf-8"))[:n]


def training_ids(tok, record):
    """BOS + the Alpaca prompt as one text, then the response on its own: prepare_data.py's training sequence."""
    prompt = tok.encode(prepare_data.format_prompt(record["instruction"], record["input"]), bos=True)
    return prompt + tok.encode(record["output"], bos=False), len(prompt)


def lens_reference(logits_of, tok, records):
    """Mean entropy, rank (1 + the number of strictly larger logits), probability and top-1 rate of the true next
    token over all response positions, from `logits_of(tokens [1, T]) -> [1, T, V]` of each unpadded sequence."""
    stats, n = torch.zeros(4, dtype=torch.float64), 0
    top1_first = []
    for index, record in enumerate(records):
        ids, prompt_len = training_ids(tok, record)
        logits = logits_of(torch.tensor([ids[:-1]]))[0].double()                 # [T, V]
        for t in range(prompt_len - 1, len(ids) - 1):
            z, target = logits[t], ids[t + 1]
            p = z.softmax(-1)
            stats += torch.stack([-torch.xlogy(p, p).sum(), 1 + (z > z[target]).sum(), p[target],
                                  (z.argmax() == target).double()])
            n += 1
            if index == 0:
                top1_first.append(int(z.argmax()))
    return (stats / n).tolist(), n, top1_first


def shallow_copy(model, k):
    """A model of the first k blocks (and the same embedding, final norm and head): its forward is layer k's lens."""
    args = dataclasses.replace(model.args, n_layers=k, sliding_layers=model.args.sliding_layers[:k])
    shallow = Transformer(args)
    shallow.load_state_dict({name: t for name, t in model.state_dict().items()
                             if not name.startswith("layers.") or int(name.split(".")[1]) < k})
    return shallow.eval()


def sharpened(path):
    """The tiny model with its final norm scaled 20x: a random tiny model's outputs are nearly uniform, which would
    let a wrong lens pass an entropy check; this touches only the head path, so every layer's lens sharpens."""
    model = Transformer.from_pretrained(path).eval()
    offset = model.args.norm_offset
    with torch.no_grad():
        model.norm.weight.copy_((model.norm.weight + offset) * 20 - offset)
    return model


def test_lens_sequences_are_the_training_sequences(tiny):
    _, tok, _ = tiny
    records = sample_records(3)
    sequences, notes = ev.lens_sequences(tok, records, max_len=4096)
    assert notes == []
    for s, r in zip(sequences, records):
        ids, prompt_len = training_ids(tok, r)
        assert s.ids == ids and s.first == prompt_len - 1
    # Too long: the response loses its end; a prompt that fills the context leaves nothing to read.
    ids, prompt_len = training_ids(tok, records[0])
    cut, notes = ev.lens_sequences(tok, records[:1], max_len=prompt_len + 2)
    assert cut[0].ids == ids[:prompt_len + 3] and "cut" in notes[0]
    none, notes = ev.lens_sequences(tok, records[:1], max_len=prompt_len - 1)
    assert none == [] and "left out" in notes[0]


def test_lens_at_every_layer_equals_a_model_that_stops_there(tiny):
    _, tok, path = tiny
    model = sharpened(path)
    records = sample_records(3)
    sequences, _ = ev.lens_sequences(tok, records, model.args.max_seq_len)
    # Padded batches of 2 and chunks of 7 positions: the batching and chunking must not show in the numbers.
    result = ev.logit_lens(model, sequences, tok.pad_id, batch_size=2, chunk_size=7, show=5)
    N = model.args.n_layers
    assert [row["layer"] for row in result.layers] == list(range(N + 1))

    # The last layer is the model's own output distribution.
    (entropy, rank, prob, top1), n, top1_first = lens_reference(model, tok, records)
    last = result.layers[N]
    assert result.positions == n
    assert last["entropy"] == pytest.approx(entropy, abs=1e-4)
    assert entropy < 0.8 * math.log(model.args.vocab_size)          # sharp enough for the check to mean something
    assert last["rank"] == pytest.approx(rank, abs=1e-9)
    assert last["prob"] == pytest.approx(prob, rel=1e-4)
    assert last["top1"] == pytest.approx(top1, abs=1e-9)
    assert result.shown_top1[N] == top1_first[:5]
    ids, prompt_len = training_ids(tok, records[0])
    assert result.shown_targets == ids[prompt_len:prompt_len + 5]

    # Layer k < N is the output of a model cut after k blocks (k = 0: embedding -> final norm -> head).
    for k in range(N):
        (entropy, rank, prob, top1), _, top1_first = lens_reference(shallow_copy(model, k), tok, records)
        row = result.layers[k]
        assert row["entropy"] == pytest.approx(entropy, abs=1e-4), k
        assert row["rank"] == pytest.approx(rank, abs=1e-9), k
        assert row["prob"] == pytest.approx(prob, rel=1e-4), k
        assert result.shown_top1[k] == top1_first[:5], k
    # The layers do differ, so the comparison above is not of one number with itself.
    assert len({round(row["entropy"], 3) for row in result.layers}) > 1


def drop_curve(n_layers, drops, start=10.0, slope=0.02):
    """Entropy of layers 1..n falling `slope` per block plus `drops[k]` at block k."""
    curve, h = [], start
    for k in range(1, n_layers + 1):
        h -= slope + drops.get(k, 0.0)
        curve.append(h)
    return curve


def test_suggested_layers_on_curves_with_known_drops():
    assert ev.lens_windows(32) == (range(2, 11), range(11, 22))
    assert ev.lens_windows(26) == (range(2, 9), range(9, 18))
    assert ev.lens_windows(4) == (range(2, 3), range(3, 4))

    # The paper's LLaMA-2-7B reading: drops at 2 and 15.
    assert ev.suggest_layers(drop_curve(32, {2: 2.0, 15: 1.0}), "llama") == (2, 15, [])
    # A larger drop past the middle third (25) is not the ET layer; the largest in each window wins.
    assert ev.suggest_layers(drop_curve(32, {4: 1.5, 7: 0.9, 13: 0.8, 19: 0.5, 25: 3.0}), "llama") == (4, 13, [])
    assert ev.suggest_layers(drop_curve(26, {3: 1.0, 9: 0.3, 11: 0.6}), "gemma2") == (3, 11, [])
    # A tie goes to the earlier layer.
    assert ev.suggest_layers(drop_curve(32, {3: 1.0, 5: 1.0, 16: 1.0}), "llama")[:2] == (3, 16)

    # A flat curve, or one that only wiggles: the defaults, and a note that says so.
    for family, n in (("llama", 32), ("gemma2", 26)):
        i, j, notes = ev.suggest_layers([7.0] * n, family)
        assert (i, j) == default_layers(n, family) and any("flat" in note for note in notes)
        wiggle = [7.0 + 0.01 * (k % 2) for k in range(n)]
        assert ev.suggest_layers(wiggle, family)[:2] == default_layers(n, family)
    # A smooth decline has no clear drop either.
    i, j, notes = ev.suggest_layers([10.0 - 0.2 * k for k in range(32)], "llama")
    assert (i, j) == (2, 15) and len(notes) == 2 and notes[0].startswith("i:") and notes[1].startswith("j:")
    # Entropy rising through the first third: i falls back, j still read off its drop.
    rising = [5.0 + 0.3 * k for k in range(10)] + drop_curve(22, {6: 3.0}, start=8.0)
    i, j, notes = ev.suggest_layers(rising, "llama")
    assert (i, j) == (2, 16) and len(notes) == 1 and notes[0].startswith("i: no clear entropy drop in layers 2..10")
    # 4 blocks: i = 2 from its drop, j's window (layer 3) has none and its default 2 is not after i -> both defaults.
    i, j, notes = ev.suggest_layers([5.0, 4.0, 3.9, 3.0], "llama")
    assert (i, j) == default_layers(4, "llama") == (1, 2) and "1 <= i < j <= 4" in notes[-1]


def block_matplotlib(monkeypatch):
    monkeypatch.setattr(ev, "Figure", None)                 # as evaluate.py's import leaves it without matplotlib


def test_logit_lens_cli_end_to_end(tiny_llama, tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama, model_dir)       # the default output goes into MODEL/eval
    block_matplotlib(monkeypatch)
    ev.main(["--model", str(model_dir), "--logit-lens", "--lens-examples", "3",
             "--batch-size", "2", "--device", "cpu"])
    printed = capsys.readouterr().out
    out = model_dir / "eval"
    assert "PNG skipped: pip install matplotlib" in printed and not (out / "logit_lens.png").exists()

    report = json.loads((out / "logit_lens.json").read_text(encoding="utf-8"))
    model, tok = Transformer.from_pretrained(model_dir).eval(), Tokenizer(model_dir)
    N = model.args.n_layers
    records = sample_records(3)
    (entropy, rank, prob, _), n, _ = lens_reference(model, tok, records)
    assert report["examples"] == 3 and report["positions"] == n and report["n_layers"] == N
    assert report["data"] == str(SAMPLE_VI) and report["lang"] == "vi"
    assert [row["layer"] for row in report["layers"]] == list(range(N + 1))
    assert report["layers"][N]["entropy"] == pytest.approx(entropy, abs=1e-4)
    assert report["layers"][N]["rank"] == pytest.approx(rank, abs=1e-9)
    assert report["layers"][N]["prob"] == pytest.approx(prob, rel=1e-4)
    for row in report["layers"]:
        assert 0.0 <= row["entropy"] <= math.log(model.args.vocab_size) + 1e-4
        assert 1.0 <= row["rank"] <= model.args.vocab_size and 0.0 <= row["prob"] <= 1.0
    ids, prompt_len = training_ids(tok, records[0])
    pieces = [tok.sp.id_to_piece(t) for t in ids[prompt_len:prompt_len + ev.LENS_SHOWN]]
    assert report["first_example"]["targets"] == pieces
    assert len(report["first_example"]["top1"]) == N + 1
    i, j = report["suggested"]["lc_layer"], report["suggested"]["et_layer"]
    assert 1 <= i < j <= N

    md = (out / "logit_lens.md").read_text(encoding="utf-8")
    assert md in printed
    assert f"**Suggested: `--lc-layer {i} --et-layer {j}`**" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and "%" in line]
    assert len(table) == N + 1
    assert table[N].startswith(f"| {N}") and f"| {report['layers'][N]['entropy']:.3f} |" in table[N]
    assert "| **true next token** | " + " | ".join(f"`{p}`" for p in pieces) + " |" in md
    assert "PNG skipped: pip install matplotlib" in md

    if importlib.util.find_spec("matplotlib") is not None:
        monkeypatch.undo()
        ev.main(["--model", str(model_dir), "--logit-lens", "--lens-examples", "2", "--device", "cpu",
                 "--out", str(tmp_path / "with_png")])
        assert (tmp_path / "with_png" / "logit_lens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_model_without_bos_generates_and_runs_the_logit_lens(tiny_qwen2, tmp_path, capsys, monkeypatch):
    """Qwen2's tokenizer adds no BOS and reads tokenizer.json: --prompt and --logit-lens work on it."""
    ev.main(["--model", str(tiny_qwen2), "--prompt", "Give three tips.", "--max-new-tokens", "6", "--device", "cpu"])
    printed = capsys.readouterr().out.strip()
    model, tok = Transformer.from_pretrained(tiny_qwen2), Tokenizer(tiny_qwen2)
    assert tok.bos_id is None and tok.sp is None
    ids = tok.encode(prepare_data.PROMPT_NO_INPUT.format(instruction="Give three tips."), bos=True)
    assert printed == tok.decode(naive_greedy(model, tok, ids, 6)).strip()
    block_matplotlib(monkeypatch)
    ev.main(["--model", str(tiny_qwen2), "--logit-lens", "--lens-examples", "2",
             "--device", "cpu", "--out", str(tmp_path / "lens")])
    report = json.loads((tmp_path / "lens" / "logit_lens.json").read_text(encoding="utf-8"))
    ids, prompt_len = training_ids(tok, sample_records(1)[0])
    assert report["first_example"]["targets"] == [tok.piece(t) for t in ids[prompt_len:prompt_len + ev.LENS_SHOWN]]


def test_logit_lens_bad_input_is_one_line(tiny_llama, tmp_path):
    base = ["--model", str(tiny_llama), "--logit-lens", "--device", "cpu", "--out", str(tmp_path / "out")]
    records = sample_records(3)
    del records[1]["output"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        ev.main(base + ["--lens-data", str(bad)])
    message = str(info.value)
    assert f"{bad}: record 1: field 'output' is missing" in message and "\n" not in message

    missing = tmp_path / "nope.json"
    with pytest.raises(SystemExit) as info:
        ev.main(base + ["--lens-data", str(missing)])
    assert str(missing) in str(info.value) and "--lens-data" in str(info.value) and "\n" not in str(info.value)

    bad.write_text("[]", encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        ev.main(base + ["--lens-data", str(bad)])
    assert "empty" in str(info.value)

    for extra in (["--prompt", "hi"], ["--lens-examples", "0"], ["--lens-lang", "fr"]):
        with pytest.raises(SystemExit) as info:
            ev.main(base + extra)
        assert info.value.code == 2          # argparse's usage error, before anything is loaded
    assert not (tmp_path / "out").exists()
