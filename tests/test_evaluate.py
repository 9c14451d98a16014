"""Tests for evaluate.py against independent references: F1/EM values computed by hand from the official MLQA and
MKQA scripts' rules, the fixture files' contents as written, log-likelihoods from the uncached full-logits forward
of one unpadded sequence at a time, naive argmax decoding without a cache, and a scripted fake model for the
stopping rules."""

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import evaluate as ev  # noqa: E402
from model import Tokenizer, Transformer  # noqa: E402

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


def test_tie_is_never_correct():
    assert ev.strictly_best([-1.0, -2.0, -3.0], 0)
    assert not ev.strictly_best([-1.0, -1.0, -3.0], 0)             # argmax would pick 0
    assert not ev.strictly_best([-2.0, -1.0], 0)
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
    assert not bad.counts
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


def test_alpaca_templates_are_the_training_ones():
    import prepare_data
    assert ev.ALPACA_NO_INPUT == prepare_data.PROMPT_NO_INPUT
    assert ev.ALPACA_INPUT == prepare_data.PROMPT_WITH_INPUT


def _line_of_nth_object(text: str, n: int) -> int:
    """1-based line of the n-th (0-based) element of a pretty-printed top-level JSON array."""
    starts = [i for i, line in enumerate(text.splitlines(), 1) if line.rstrip() == "    {"]   # json.dumps(indent=4)
    return starts[n]


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
     _json_edit(lambda rows: rows[1].update(answer="E")), 3, ["'answer' is 'E'", "A/B/C/D"]),
    ("truthfulqa/zh_validation.json", ev.read_truthfulqa, "zh",
     _json_edit(lambda rows: rows[2].update(mc1_targets_labels=[1, 1, 0])), 2, ["'mc1_targets_labels'", "exactly one"]),
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
    if rel.endswith(".json") and "xquad" not in rel:     # JSON arrays: the line where the bad element starts
        assert f"line {_line_of_nth_object(path.read_text(encoding='utf-8'), 1 if 'mmlu' in rel else 2)}:" in message
    bad = ev.BadRows(skip=True)
    assert len(reader(path, lang, bad)) == n_left and bad.counts[str(path)] == 1


def test_mkqa_gzip_release_is_preferred_and_read_the_same(tmp_path):
    import gzip
    (tmp_path / "mkqa").mkdir()
    shutil.copy(BENCH / "mkqa" / "mkqa.jsonl", tmp_path / "mkqa" / "mkqa.jsonl")
    with gzip.open(tmp_path / "mkqa" / "mkqa.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write((BENCH / "mkqa" / "mkqa.jsonl").read_text(encoding="utf-8").replace("Pa-ri", "Pa ri"))
    path = ev.BENCHMARKS["mkqa"].file(tmp_path, "vi")
    assert path.name == "mkqa.jsonl.gz"
    assert ev.read_mkqa(path, "vi", ev.BadRows())[0]["answers"] == ["Paris", "Pa ri"]


def test_json_array_and_jsonl_line_numbers(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('\n[\n  {"a": 1},\n\n  {"a": 2,\n   "b": 3}, {"a": 4}\n]\n', encoding="utf-8")
    assert list(ev._rows_with_lines(path)) == [(3, {"a": 1}), (5, {"a": 2, "b": 3}), (6, {"a": 4})]
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert list(ev._rows_with_lines(path)) == [(1, {"a": 1}), (3, {"a": 2})]
    path.write_text('[\n  {"a": 1}\n  {"a": 2}\n]', encoding="utf-8")
    with pytest.raises(ValueError, match="line 3: expected ',' or ']'"):
        list(ev._rows_with_lines(path))


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


def test_tied_choices_score_zero(tiny):
    model, tok, _ = tiny
    # Identical choices have identical likelihoods; with the true answer first, an argmax would score 100.
    row = dict(question="Q?", mc1_choices=["same answer", "same answer"], mc1_labels=[1, 0],
               mc2_choices=["same answer", "same answer"], mc2_labels=[1, 0])
    got = ev.evaluate_cell(model, tok, ev.BENCHMARKS["truthfulqa"], "vi", [row], 4, 8, Counter())
    assert got == {"mc1": 0.0, "mc2": pytest.approx(50.0)}
    copa = dict(premise="Trời mưa.", choice1="Đi.", choice2="Đi.", question="effect", label=0)
    got = ev.evaluate_cell(model, tok, ev.BENCHMARKS["xcopa"], "vi", [copa], 4, 8, Counter())
    assert got == {"acc": 0.0, "acc_norm": 0.0}


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
        self.args = type("Args", (), {"max_seq_len": 64})()

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
    assert [ev.answer_text(tok, g) for g in got] == ["ab", "a", "ab ab a", ""]
    assert ev.greedy_generate(model, tok, prompts[:1], max_new_tokens=5, stop_at_newline=False) == [[nl, a, b, nl, a]]


# ---------------------------------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------------------------------

def test_cli_end_to_end_on_the_fixtures(tiny_llama, tmp_path):
    out = tmp_path / "eval"
    ev.main(["--model", str(tiny_llama), "--data-dir", str(BENCH), "--out", str(out), "--limit", "2",
             "--batch-size", "4", "--max-new-tokens", "6", "--device", "cpu"])
    rows = json.loads((out / "results.json").read_text(encoding="utf-8"))
    cells = {(r["task"], r["lang"]) for r in rows}
    want = {(name, lang) for name, b in ev.BENCHMARKS.items() for lang in b.langs}
    assert cells == want and ("xcopa", "ar") not in cells and ("xstorycloze", "vi") not in cells
    for r in rows:
        assert set(r) == {"task", "lang", "metric", "value", "n", "prompt"}
        assert 0.0 <= r["value"] <= 100.0 and r["n"] == 2
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
    for p in preds:   # the written scores are the metric applied to the written prediction
        assert p["f1"] == ev.qa_f1(p["prediction"], p["answers"], "zh")


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
    assert "skipped 1 malformed row(s)" in (out / "results.md").read_text(encoding="utf-8")


def test_prompt_mode_prints_the_greedy_response(tiny_llama, capsys):
    ev.main(["--model", str(tiny_llama), "--prompt", "Give three tips.", "--max-new-tokens", "6", "--device", "cpu"])
    printed = capsys.readouterr().out.strip()
    model, tok = Transformer.from_pretrained(tiny_llama), Tokenizer(tiny_llama)
    ids = tok.encode(ev.ALPACA_NO_INPUT.format(instruction="Give three tips."), bos=True)
    assert printed == tok.decode(naive_greedy(model, tok, ids, 6)).strip()
