"""prepare_data.py: validation of broken files, token-by-token labels and content masks on a real SentencePiece model,
collate round trips, SFT mode, meta checks and damaged prepared directories.

Expected values are built independently of prepare_data's own assembly: by decoding the produced tokens back to text,
or by encoding the source texts here and laying out the expected label lists by hand.
"""

import errno
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare_data as pd
from conftest import ROOT
from model import Tokenizer

EN = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep well."},
    {"instruction": "What is the capital of France?", "input": "France is a country in Europe.",
     "output": "The capital of France is Paris."},
    {"instruction": "Translate the sentence into French.", "input": "Good morning.", "output": "Bonjour."},
    {"instruction": "What is 2 + 2?", "input": "", "output": "4"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
]
VI = [
    {"instruction": "Hãy đưa ra ba lời khuyên để giữ gìn sức khỏe.", "input": "",
     "output": "1. Ăn uống cân bằng.\n2. Tập thể dục đều đặn.\n3. Ngủ đủ giấc."},
    {"instruction": "Thủ đô của Pháp là gì?", "input": "Pháp là một quốc gia ở châu Âu.",
     "output": "Thủ đô của Pháp là Paris."},
    {"instruction": "Dịch câu sau sang tiếng Pháp.", "input": "Chào buổi sáng.", "output": "Bonjour."},
    {"instruction": "2 + 2 bằng bao nhiêu?", "input": "", "output": "4"},
    # the translation put the colour into an input: kept
    {"instruction": "Hãy kể tên một màu cơ bản.", "input": "Màu", "output": "Màu đỏ."},
]
ZH = [
    {"instruction": "给出三个保持健康的建议。", "input": "", "output": "1. 均衡饮食。\n2. 经常锻炼。\n3. 睡眠充足。"},
    {"instruction": "法国的首都是哪里？", "input": "法国是欧洲的一个国家。", "output": "法国的首都是巴黎。"},
]

BATCH_KEYS = {"tft_tokens", "tft_labels", "tft_mask", "tgt_prompt_len", "tgt_content", "lc_tokens", "lc_labels",
              "lc_mask", "lc_content", "et_tokens", "et_labels", "et_mask", "en_tokens", "en_mask", "en_content"}


def write_json(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def squash(text: str) -> str:
    """Text without whitespace: piece-wise encoding adds a dummy-prefix space at each piece boundary."""
    return "".join(text.split())


def runs(mask) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    found, start = [], None
    for t, value in enumerate(list(mask) + [0]):
        if value and start is None:
            start = t
        elif not value and start is not None:
            found.append((start, t))
            start = None
    return found


def content_texts(record) -> list[str]:
    return [record["instruction"]] + ([record["input"]] if record["input"].strip() else [])


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def tokenizer_dir(request, tiny_llama, tiny_gemma2):
    return tiny_llama if request.param == "llama" else tiny_gemma2


@pytest.fixture
def prepared_vi(tmp_path, tokenizer_dir):
    en, vi = write_json(tmp_path / "alpaca_en.json", EN), write_json(tmp_path / "alpaca_vi.json", VI)
    out = tmp_path / "prepared"
    report = pd.main(["--lang", "vi", "--en", str(en), "--tgt", str(vi), "--tokenizer", str(tokenizer_dir),
                      "--out", str(out)])
    return report, out, Tokenizer(tokenizer_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Validation


def test_broken_files_each_defect_reported_with_file_and_index(tmp_path, tiny_llama, capsys):
    long_en = " ".join(["The quick brown fox jumps over the lazy dog and runs far away."] * 6)
    very_long_en = " ".join(["The quick brown fox jumps over the lazy dog."] * 30)
    very_long_vi = " ".join(["Con cáo nâu nhanh nhẹn nhảy qua con chó lười."] * 30)
    en = [dict(EN[0], instruction=f"{EN[0]['instruction']} Case {i}.") for i in range(14)]
    vi = [dict(VI[0], instruction=f"{VI[0]['instruction']} Trường hợp {i}.") for i in range(14)]
    del vi[1]["output"]                                          # missing_field, tgt
    en[2]["instruction"] = 42                                    # not_a_string, en
    vi[3]["output"] = "   "                                      # empty_output, tgt
    vi[4] = "Hãy đưa ra ba lời khuyên"                           # not_an_object, tgt
    en[5]["output"], vi[5]["output"] = long_en, "Vâng."          # length_ratio (a translation cut short), tgt
    en[6]["output"], vi[6]["output"] = very_long_en, very_long_vi  # too_long
    en[7]["instruction"] = ""                                    # empty_instruction, en
    en[8], vi[8] = dict(EN[1]), dict(VI[1])                      # good, duplicated at 11
    en[9]["id"] = vi[9]["id"] = 9                                # good; an extra field is ignored
    del en[10]["input"]                                          # missing_field, en
    en[11], vi[11] = dict(EN[1]), dict(VI[1])                    # duplicate of 8 in both files: kept
    en[12]["output"], vi[12]["output"] = ["a list"], ""          # both sides broken: one drop, the English defect
    vi[13]["input"] = "Xin chào\u2581thế giới"                   # word_marker (U+2581), tgt
    en_file, vi_file = write_json(tmp_path / "alpaca_en.json", en), write_json(tmp_path / "alpaca_vi.json", vi)
    out = tmp_path / "out"

    report = pd.main(["--lang", "vi", "--en", str(en_file), "--tgt", str(vi_file), "--tokenizer", str(tiny_llama),
                      "--out", str(out), "--max-len", "400", "--overlong", "drop"])

    expected = [("missing_field", vi_file, 1), ("not_a_string", en_file, 2), ("empty_output", vi_file, 3),
                ("not_an_object", vi_file, 4), ("length_ratio", vi_file, 5), ("too_long", vi_file, 6),
                ("empty_instruction", en_file, 7), ("missing_field", en_file, 10), ("not_a_string", en_file, 12),
                ("word_marker", vi_file, 13)]
    assert [(d["reason"], d["file"], d["index"]) for d in report["drops"]] == [(r, str(f), i) for r, f, i in expected]
    assert report["dropped"] == {"missing_field": 2, "not_a_string": 2, "empty_output": 1, "not_an_object": 1,
                                 "word_marker": 1, "length_ratio": 1, "too_long": 1, "empty_instruction": 1}
    assert report["kept"] == 4 and report["records"] == {"en": 14, "tgt": 14}
    details = {d["index"]: d["detail"] for d in report["drops"]}
    assert "'output'" in details[1] and "'instruction'" in details[2] and "number" in details[2]
    assert "'input'" in details[10] and "array" in details[12] and "tft has" in details[6]
    assert "'input'" in details[13] and "U+2581" in details[13]
    for path in (en_file, vi_file):
        assert report["duplicates_kept"][str(path)] == {"count": 1, "examples": [{"index": 11, "same_as": 8}]}

    printed = capsys.readouterr().err
    for reason, path, index in expected:
        assert f"{path}[{index}]" in printed and reason in printed

    ds = pd.load_prepared(out)
    assert [ds.source_index(i) for i in range(len(ds))] == [0, 8, 9, 11]
    tok = Tokenizer(tiny_llama)
    example = ds[1]
    assert tok.decode(example["tft_tokens"][example["tgt_prompt_len"]:]) == VI[1]["output"]
    assert json.loads((out / "report.json").read_text()) == report
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"]["kept"] == 4 and meta["counts"]["dropped"] == report["dropped"]


def test_length_mismatch_stops_with_both_counts(tmp_path, tiny_llama):
    en_file = write_json(tmp_path / "alpaca_en.json", EN[:3])
    vi_file = write_json(tmp_path / "alpaca_vi.json", VI[:2])
    args = ["--lang", "vi", "--en", str(en_file), "--tgt", str(vi_file), "--tokenizer", str(tiny_llama),
            "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        pd.main(args)
    message = str(stop.value)
    assert f"{en_file} has 3 examples" in message and f"{vi_file} has 2" in message
    assert "--allow-length-mismatch" in message and "\n" not in message
    assert not (tmp_path / "out").exists()

    report = pd.main(args + ["--allow-length-mismatch"])
    assert report["kept"] == 2 and report["dropped"] == {"unpaired": 1}
    assert [(d["file"], d["index"]) for d in report["drops"]] == [(str(en_file), 2)]


def test_unreadable_files_one_line(tmp_path, tiny_llama):
    good = write_json(tmp_path / "good.json", EN[:2])
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a",\n "input": ""', encoding="utf-8")
    not_list = write_json(tmp_path / "object.json", {"instruction": "a", "input": "", "output": "b"})
    base = ["--lang", "vi", "--tokenizer", str(tiny_llama), "--out", str(tmp_path / "out")]
    cases = [(broken, "line 2"), (not_list, "top level is a JSON object"), (tmp_path / "absent.json", "not found")]
    for bad, expected in cases:
        with pytest.raises(SystemExit) as stop:
            pd.main(base + ["--en", str(good), "--tgt", str(bad)])
        assert str(bad) in str(stop.value) and expected in str(stop.value) and "\n" not in str(stop.value)


def test_missing_tokenizer_names_path_and_fix(tmp_path):
    en_file, vi_file = write_json(tmp_path / "en.json", EN), write_json(tmp_path / "vi.json", VI)
    with pytest.raises(SystemExit) as stop:
        pd.main(["--lang", "vi", "--en", str(en_file), "--tgt", str(vi_file), "--tokenizer", str(tmp_path / "nomodel"),
                 "--out", str(tmp_path / "out")])
    message = str(stop.value)
    assert str(tmp_path / "nomodel") in message and "--make-tiny" in message and "\n" not in message


def test_bad_flag_combinations(tmp_path, tiny_llama):
    en_file = write_json(tmp_path / "en.json", EN)
    for args, expected in [(["--lang", "vi", "--en", str(en_file)], "--en and --tgt go together"),
                           (["--lang", "en"], "--sft"),
                           (["--sft", "--tgt", str(en_file)], "English only"),
                           (["--en", str(en_file), "--tgt", str(en_file)], "--lang is required"),
                           (["--lang", "xx"], "no bundled sample")]:
        with pytest.raises(SystemExit, match=expected):
            pd.main(args + ["--tokenizer", str(tiny_llama), "--out", str(tmp_path / "out")])


def test_refuses_a_foreign_directory_and_replaces_its_own_only_with_overwrite(tmp_path, tiny_llama):
    en_file, vi_file = write_json(tmp_path / "en.json", EN), write_json(tmp_path / "vi.json", VI)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    args = ["--lang", "vi", "--en", str(en_file), "--tgt", str(vi_file), "--tokenizer", str(tiny_llama)]
    with pytest.raises(SystemExit, match="not a prepared-data directory"):
        pd.main(args + ["--out", str(foreign)])
    assert (foreign / "notes.txt").read_text() == "mine"

    out = tmp_path / "out"
    (tmp_path / "out.tmp").mkdir()                              # a crashed run's staging dir
    (tmp_path / "out.tmp" / "x_en.ids.npy").write_text("half")
    pd.main(args + ["--out", str(out)])
    write_json(vi_file, VI[:3])
    write_json(en_file, EN[:3])
    with pytest.raises(SystemExit) as stop:
        pd.main(args + ["--out", str(out)])
    message = str(stop.value)
    assert str(out) in message and "--overwrite" in message and "\n" not in message
    assert len(pd.load_prepared(out)) == len(EN)
    pd.main(args + ["--out", str(out), "--overwrite"])
    assert len(pd.load_prepared(out)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["en.json", "foreign", "out", "vi.json"]


def test_unwritable_out_one_line_and_no_half_directory(tmp_path, tiny_llama, monkeypatch):
    en_file, vi_file = write_json(tmp_path / "en.json", EN), write_json(tmp_path / "vi.json", VI)
    args = ["--lang", "vi", "--en", str(en_file), "--tgt", str(vi_file), "--tokenizer", str(tiny_llama)]
    blocker = write_json(tmp_path / "a-file", [])
    with pytest.raises(SystemExit) as stop:                     # a dir under a file: refused at once
        pd.main(args + ["--out", str(blocker / "out")])
    message = str(stop.value)
    assert f"--out {blocker / 'out'}" in message and "cannot write" in message and "\n" not in message

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "x_tgt.ids.npy")

    monkeypatch.setattr(pd.np, "save", disk_full)               # a failure half-way through writing
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        pd.main(args + ["--out", str(out)])
    message = str(stop.value)
    assert f"--out {out}" in message and "No space left on device" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "en.json", "vi.json"]


def test_help_gives_every_default_and_no_developer_notes(capsys):
    with pytest.raises(SystemExit):
        pd.parse_args(["--help"])
    text = capsys.readouterr().out
    # One block per option: its line starts with two spaces and a dash, its wrapped help indented deeper.
    blocks = re.split(r"\n(?=  -)", text.split("options:\n")[1].split("\n\n")[0])
    helps = {re.findall(r"--[a-z-]+", block)[0]: " ".join(block.split()) for block in blocks}
    assert {"--overlong", "--overwrite", "--allow-length-mismatch", "--max-len"} <= helps.keys()
    assert not {"--workers", "--allow-truncate"} & helps.keys()
    for option, help_text in helps.items():
        assert option == "--help" or "default" in help_text, option
    source = Path(pd.__file__).read_text(encoding="utf-8")
    # No pointer to the developers' own notes, which users do not have.
    assert not [name for name in ("METHOD", "DESIGN", "STYLE") if f"{name}.md" in source]


# ---------------------------------------------------------------------------------------------------------------------
# Labels and content masks, token by token


def test_labels_and_content_masks_token_by_token(prepared_vi):
    report, out, tok = prepared_vi
    ds = pd.load_prepared(out)
    assert report["kept"] == len(ds) == len(EN)
    for i in range(len(ds)):
        en, vi = EN[ds.source_index(i)], VI[ds.source_index(i)]
        ex = ds[i]
        assert set(ex) == BATCH_KEYS
        P = ex["tgt_prompt_len"]
        tft, lc, et, x_en = (ex[k].tolist() for k in ("tft_tokens", "lc_tokens", "et_tokens", "en_tokens"))

        # x_tgt: BOS, then the target prompt in the English template, ending at "### Response:" (P tokens).
        for seq in (tft, lc, et, x_en):
            assert seq[0] == tok.bos_id and seq.count(tok.bos_id) == 1  # lc: x_en's BOS is not repeated
        assert tft[:P] == lc[:P] == et[:P]
        assert tok.decode(tft[:P]).endswith("### Response:")
        assert squash(tok.decode(tft[:P])) == squash(pd.format_prompt(vi["instruction"], vi["input"]))
        # The prompt is the joint encoding a user's prompt gets at inference, not a concatenation of pieces.
        assert tft[:P] == tok.encode(pd.format_prompt(vi["instruction"], vi["input"]))
        assert x_en == tok.encode(pd.format_prompt(en["instruction"], en["input"]))

        # tft: exactly the target response + EOS supervised, the first response token predicted from position P-1.
        y_tgt = tok.encode(vi["output"], bos=False) + [tok.eos_id]
        assert tft[P:] == y_tgt
        assert ex["tft_labels"].tolist() == [-100] * (P - 1) + y_tgt + [-100]
        assert ex["tft_labels"][P - 1] == y_tgt[0] and ex["tft_labels"][len(tft) - 2] == tok.eos_id

        # et: same prompt, the English response + EOS supervised.
        y_en = tok.encode(en["output"], bos=False) + [tok.eos_id]
        assert et[P:] == y_en
        assert ex["et_labels"].tolist() == [-100] * (P - 1) + y_en + [-100]

        # lc: all of x_en supervised (template included); no EOS after a prompt.
        assert squash(tok.decode(lc[P:])) == squash(pd.format_prompt(en["instruction"], en["input"]))
        assert ex["lc_labels"].tolist() == [-100] * (P - 1) + lc[P:] + [-100]
        assert tok.eos_id not in lc

        # en: x_en alone, the same tokens as lc's second half.
        assert x_en[1:] == lc[P:]
        # en_content (token space) and lc_content (label space) mark exactly x_en's instruction + input tokens.
        en_runs = runs(ex["en_content"].tolist())
        assert [tok.decode(x_en[a:b]) for a, b in en_runs] == content_texts(en)
        assert_tight(tok, x_en, en_runs, content_texts(en))
        en_content_ids = [x_en[t] for t in range(len(x_en)) if ex["en_content"][t]]
        lc_runs = runs(ex["lc_content"].tolist())
        lc_labels = ex["lc_labels"].tolist()
        assert [tok.decode(lc_labels[a:b]) for a, b in lc_runs] == content_texts(en)
        assert [lc_labels[t] for t in range(len(lc)) if ex["lc_content"][t]] == en_content_ids
        assert all(lc_labels[t] == lc[t + 1] for t in range(len(lc)) if ex["lc_content"][t])

        # tgt_content (token space over tft) marks x_tgt's instruction + input, nothing of the template or response.
        tgt_runs = runs(ex["tgt_content"].tolist())
        assert [tok.decode(tft[a:b]) for a, b in tgt_runs] == content_texts(vi)
        assert all(b <= P for _, b in tgt_runs)
        assert_tight(tok, tft, tgt_runs, content_texts(vi))

        for key, seq in (("tft_mask", tft), ("lc_mask", lc), ("et_mask", et), ("en_mask", x_en)):
            assert ex[key].tolist() == [1] * len(seq)
        for key, seq in (("tft_labels", tft), ("lc_labels", lc), ("et_labels", et), ("tgt_content", tft),
                         ("lc_content", lc), ("en_content", x_en)):
            assert len(ex[key]) == len(seq)


def assert_tight(tok, ids, spans, texts):
    """Each marked run decodes to its field's text and is minimal: without its first or last token it would not."""
    for (a, b), text in zip(spans, texts):
        assert tok.decode(ids[a:b]).strip() == text.strip()
        assert tok.decode(ids[a + 1:b]).strip() != text.strip() and tok.decode(ids[a:b - 1]).strip() != text.strip()


def test_content_masks_in_chinese(tmp_path, tiny_llama):
    en_file, zh_file = write_json(tmp_path / "en.json", EN[:2]), write_json(tmp_path / "zh.json", ZH)
    pd.main(["--lang", "zh", "--en", str(en_file), "--tgt", str(zh_file), "--tokenizer", str(tiny_llama),
             "--out", str(tmp_path / "out")])
    tok, ds = Tokenizer(tiny_llama), pd.load_prepared(tmp_path / "out")
    for i in range(2):
        ex = ds[i]
        tft = ex["tft_tokens"].tolist()
        assert [tok.decode(tft[a:b]) for a, b in runs(ex["tgt_content"].tolist())] == content_texts(ZH[i])
        assert tok.decode(tft[ex["tgt_prompt_len"]:]) == ZH[i]["output"]


def test_alpaca_prompt_ids_match_training_prompts(prepared_vi):
    _, out, tok = prepared_vi
    ds = pd.load_prepared(out)
    for i in range(len(ds)):
        ex = ds[i]
        vi = VI[ds.source_index(i)]
        assert pd.alpaca_prompt_ids(tok, vi["instruction"], vi["input"]) == \
            ex["tft_tokens"][:ex["tgt_prompt_len"]].tolist()


# ---------------------------------------------------------------------------------------------------------------------
# Over-long sequences: cut at --max-len (default) or dropped


LONG_EN = " ".join(["The quick brown fox jumps over the lazy dog and runs far away."] * 5)
LONG_VI = " ".join(["Con cáo nâu nhanh nhẹn nhảy qua con chó lười rồi chạy đi xa."] * 5)
# 0 and 4 fit or nearly; 1 long outputs (tft, et cut); 2 a long English input and target output (lc,
# en, tft cut); 3 a target prompt longer than the limit (nothing left to supervise).
OVERLONG_EN = [EN[1], dict(EN[0], output=LONG_EN), dict(EN[1], input=LONG_EN), EN[2], EN[3]]
OVERLONG_VI = [VI[1], dict(VI[0], output=LONG_VI), dict(VI[1], output=LONG_VI),
               dict(VI[2], input=LONG_VI), VI[3]]
OVERLONG_MAX_LEN = 200
KINDS = ("tft", "lc", "et", "en")


def overlong_runs(tmp_path, tokenizer_dir, *flags):
    """The over-long files prepared with `flags`, and with a limit nothing reaches (the reference)."""
    en, vi = write_json(tmp_path / "en.json", OVERLONG_EN), write_json(tmp_path / "vi.json", OVERLONG_VI)
    args = ["--lang", "vi", "--en", str(en), "--tgt", str(vi), "--tokenizer", str(tokenizer_dir)]
    whole = pd.main(args + ["--out", str(tmp_path / "whole"), "--max-len", "4096"])
    assert whole["kept"] == len(OVERLONG_EN) and not whole["dropped"]
    report = pd.main(args + ["--out", str(tmp_path / "cut"), "--max-len", str(OVERLONG_MAX_LEN), *flags])
    return report, pd.load_prepared(tmp_path / "cut"), pd.load_prepared(tmp_path / "whole")


def test_truncate_keeps_every_pair_with_a_supervised_token_and_cuts_at_max_len(tmp_path, tokenizer_dir):
    L = OVERLONG_MAX_LEN
    report, ds, whole = overlong_runs(tmp_path, tokenizer_dir)
    tok = Tokenizer(tokenizer_dir)
    prompt_lens = [whole[i]["tgt_prompt_len"] for i in range(len(whole))]
    assert prompt_lens[3] >= L > max(prompt_lens[:3] + prompt_lens[4:])
    assert [ds.source_index(i) for i in range(len(ds))] == [0, 1, 2, 4]
    assert [(d["reason"], d["index"]) for d in report["drops"]] == [("prompt_too_long", 3)]

    expected = {kind: {"truncated": 0, "supervised_tokens": 0, "cut_tokens": 0, "emptied": 0}
                for kind in KINDS + ("lc_content",)}
    for i in range(len(ds)):
        ex, full = ds[i], whole[ds.source_index(i)]
        en, vi = OVERLONG_EN[ds.source_index(i)], OVERLONG_VI[ds.source_index(i)]
        P = full["tgt_prompt_len"]
        assert ex["tgt_prompt_len"] == P
        # By hand: the sequences from the source texts, cut after L tokens; the label of the last token
        # left pointed past the cut.
        x_tgt = tok.encode(pd.format_prompt(vi["instruction"], vi["input"]))
        x_en = tok.encode(pd.format_prompt(en["instruction"], en["input"]))
        y_tgt, y_en = (tok.encode(r["output"], bos=False) + [tok.eos_id] for r in (vi, en))
        for kind, rest in (("tft", y_tgt), ("lc", x_en[1:]), ("et", y_en)):
            tokens, labels = x_tgt + rest, [-100] * (P - 1) + rest + [-100]
            if len(tokens) > L:
                tokens, labels = tokens[:L], labels[:L - 1] + [-100]
            assert ex[f"{kind}_tokens"].tolist() == tokens, kind
            assert ex[f"{kind}_labels"].tolist() == labels, kind
            assert ex[f"{kind}_mask"].tolist() == [1] * len(tokens)
            expected[kind]["truncated"] += len(x_tgt + rest) > L
            expected[kind]["supervised_tokens"] += len(rest)
            expected[kind]["cut_tokens"] += max(0, len(x_tgt + rest) - L)
            expected[kind]["emptied"] += len(x_tgt) >= L
        assert ex["en_tokens"].tolist() == x_en[:L]
        # The content masks are the untruncated example's, cut at the same place; lc_content (label
        # space) marks no label lost to the cut.
        for key in ("tgt_content", "en_content"):
            assert ex[key].tolist() == full[key].tolist()[:L], key
        lc_content = full["lc_content"].tolist()[:L]
        if len(full["lc_tokens"]) > L:
            lc_content[-1] = 0
        assert ex["lc_content"].tolist() == lc_content
        assert ex["en_content"].sum() > 0
        expected["en"]["truncated"] += len(x_en) > L
        expected["en"]["supervised_tokens"] += int(full["en_content"].sum())
        expected["en"]["cut_tokens"] += int(full["en_content"][L:].sum())
        # LC's default targets: x_en's content tokens, at position P - 1 + q in [x_tgt ; x_en[1:]].
        content_at = [P - 1 + q for q, c in enumerate(full["en_content"].tolist()) if c]
        expected["lc_content"]["truncated"] += len(x_tgt + x_en[1:]) > L
        expected["lc_content"]["supervised_tokens"] += len(content_at)
        expected["lc_content"]["cut_tokens"] += sum(p >= L for p in content_at)
        expected["lc_content"]["emptied"] += min(content_at) >= L
    for kind, counts in expected.items():
        assert 0 < counts["truncated"] < len(ds), kind      # every kind has cut and whole sequences here
        stats = report["sequences"][kind]
        assert {k: stats[k] for k in counts} == counts, kind
        assert stats["cut_share"] == round(counts["cut_tokens"] / counts["supervised_tokens"], 5)
    assert ds.meta["counts"]["truncated"]["lc"]["sequences"] == expected["lc"]["truncated"]
    assert ds.meta["overlong"] == "truncate" and ds.meta["max_len"] == L


def test_overlong_drop_leaves_out_every_pair_with_a_long_sequence(tmp_path, tiny_llama):
    """--overlong drop, the behaviour before truncation: pairs with any sequence over the limit are
    dropped, the others are the untruncated examples, unchanged."""
    L = OVERLONG_MAX_LEN
    report, ds, whole = overlong_runs(tmp_path, tiny_llama, "--overlong", "drop")
    lengths = [{kind: len(whole[k][f"{kind}_tokens"]) for kind in KINDS} for k in range(len(whole))]
    long = [k for k, n in enumerate(lengths) if max(n.values()) > L]
    assert long and any(lengths[k]["tft"] <= L for k in long)  # lc, two prompts long, drops tft that fits
    assert [(d["reason"], d["index"]) for d in report["drops"]] == [("too_long", k) for k in long]
    kept = [ds.source_index(i) for i in range(len(ds))]
    assert kept == [k for k in range(len(whole)) if k not in long] and kept
    for i in range(len(ds)):
        ex, full = ds[i], whole[ds.source_index(i)]
        assert ex.keys() == full.keys() and ex["tgt_prompt_len"] == full["tgt_prompt_len"]
        assert all(torch.equal(ex[key], full[key]) for key in ex if key != "tgt_prompt_len")
    assert all(s["truncated"] == 0 == s["cut_tokens"] for s in report["sequences"].values())


def test_sft_truncates_the_english_sequence(tmp_path, tiny_llama):
    L = 60
    en_file = write_json(tmp_path / "en.json", OVERLONG_EN)
    report = pd.main(["--sft", "--en", str(en_file), "--tokenizer", str(tiny_llama),
                      "--out", str(tmp_path / "sft"), "--max-len", str(L)])
    tok, ds = Tokenizer(tiny_llama), pd.load_prepared(tmp_path / "sft")
    assert len(ds) == report["kept"] >= 1 and report["sequences"]["tft"]["truncated"] >= 1
    prompts = [tok.encode(pd.format_prompt(r["instruction"], r["input"])) for r in OVERLONG_EN]
    kept = [ds.source_index(i) for i in range(len(ds))]
    assert kept == [k for k, x in enumerate(prompts) if len(x) < L]   # prompts filling L are left out
    assert report["dropped"] == ({"prompt_too_long": len(OVERLONG_EN) - len(kept)}
                                 if len(kept) < len(OVERLONG_EN) else {})
    for i, k in enumerate(kept):
        x, y = prompts[k], tok.encode(OVERLONG_EN[k]["output"], bos=False) + [tok.eos_id]
        tokens, labels = x + y, [-100] * (len(x) - 1) + y + [-100]
        if len(tokens) > L:
            tokens, labels = tokens[:L], labels[:L - 1] + [-100]
        assert ds[i]["tft_tokens"].tolist() == tokens and ds[i]["tft_labels"].tolist() == labels


def test_english_prompt_cut_before_its_instruction_is_dropped_and_counted(tmp_path, tiny_llama):
    """The feature losses pool x_en's instruction and input tokens; an x_en cut before them would leave
    nothing to pool. It happens when only the English side has an input (a longer template preamble)."""
    tok = Tokenizer(tiny_llama)
    en = [dict(EN[1], instruction="Name a colour.", input="Red"), EN[0]]
    vi = [dict(VI[1], instruction="Đỏ.", input=""), VI[0]]
    L = len(tok.encode(pd.format_prompt(vi[0]["instruction"], ""))) + 1
    preamble = pd.PROMPT_WITH_INPUT[:pd.PROMPT_WITH_INPUT.index("{instruction}")]
    assert len(tok.encode(preamble)) > L + 1                    # x_en's instruction starts after the cut
    en_file, vi_file = write_json(tmp_path / "en.json", en), write_json(tmp_path / "vi.json", vi)
    report = pd.main(["--lang", "vi", "--en", str(en_file), "--tgt", str(vi_file),
                      "--tokenizer", str(tiny_llama), "--out", str(tmp_path / "out"), "--max-len", str(L)])
    assert (report["drops"][0]["reason"], report["drops"][0]["index"]) == ("en_content_cut", 0)
    ds = pd.load_prepared(tmp_path / "out")
    assert all(ds[i]["en_content"].sum() > 0 for i in range(len(ds)))


# ---------------------------------------------------------------------------------------------------------------------
# collate, SFT, meta and loading


def test_collate_round_trip(prepared_vi):
    _, out, tok = prepared_vi
    ds = pd.load_prepared(out)
    pad_id = tok.pad_id
    examples = [ds[i] for i in range(len(ds))]
    batch = pd.collate(examples, pad_id)
    assert set(batch) == BATCH_KEYS
    assert batch["tgt_prompt_len"].tolist() == [ex["tgt_prompt_len"] for ex in examples]
    for prefix, extra in (("tft", ["tgt_content"]), ("lc", ["lc_content"]), ("et", []), ("en", ["en_content"])):
        tokens, mask = batch[f"{prefix}_tokens"], batch[f"{prefix}_mask"]
        assert tokens.dtype == torch.long and tokens.shape == mask.shape
        assert tokens.shape[1] == max(len(ex[f"{prefix}_tokens"]) for ex in examples)
        for row, ex in enumerate(examples):
            n = len(ex[f"{prefix}_tokens"])
            assert mask[row].tolist() == [1] * n + [0] * (tokens.shape[1] - n)
            assert tokens[row, n:].eq(pad_id).all() and torch.equal(tokens[row, :n], ex[f"{prefix}_tokens"])
            if prefix != "en":
                labels = batch[f"{prefix}_labels"][row]
                assert labels[n:].eq(-100).all() and torch.equal(labels[:n], ex[f"{prefix}_labels"])
            for key in extra:
                assert batch[key][row, n:].eq(0).all() and torch.equal(batch[key][row, :n], ex[key])

    # Decoding each row's real tokens gives back the source texts in the template.
    for row in range(len(examples)):
        en, vi = EN[ds.source_index(row)], VI[ds.source_index(row)]
        x_en, x_vi = pd.format_prompt(en["instruction"], en["input"]), pd.format_prompt(vi["instruction"], vi["input"])
        for prefix, text in (("tft", x_vi + vi["output"]), ("lc", x_vi + x_en), ("et", x_vi + en["output"]),
                             ("en", x_en)):
            real = batch[f"{prefix}_tokens"][row][batch[f"{prefix}_mask"][row].bool()]
            assert squash(tok.decode(real)) == squash(text)
        labels = batch["tft_labels"][row]
        assert tok.decode(labels[labels != -100]) == vi["output"]


def test_dataloader(prepared_vi):
    _, out, tok = prepared_vi
    ds = pd.load_prepared(out)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=lambda b: pd.collate(b, tok.pad_id))
    assert sum(len(b["tft_tokens"]) for b in loader) == len(ds)


def test_sft_mode(tmp_path, tiny_llama):
    en_file = write_json(tmp_path / "alpaca_en.json", EN)
    out = tmp_path / "sft-en"
    report = pd.main(["--sft", "--en", str(en_file), "--tokenizer", str(tiny_llama), "--out", str(out)])
    tok, ds = Tokenizer(tiny_llama), pd.load_prepared(out)
    assert report["kept"] == len(ds) == len(EN) and ds.meta["mode"] == "sft" and ds.meta["lang"] == "en"
    for i in range(len(ds)):
        ex = ds[i]
        assert set(ex) == {"tft_tokens", "tft_labels", "tft_mask", "tgt_prompt_len"}
        P, tft = ex["tgt_prompt_len"], ex["tft_tokens"].tolist()
        y = tok.encode(EN[i]["output"], bos=False) + [tok.eos_id]
        assert squash(tok.decode(tft[:P])) == squash(pd.format_prompt(EN[i]["instruction"], EN[i]["input"]))
        assert tft[P:] == y and ex["tft_labels"].tolist() == [-100] * (P - 1) + y + [-100]
    batch = pd.collate([ds[0], ds[1]], tok.pad_id)
    assert set(batch) == {"tft_tokens", "tft_labels", "tft_mask", "tgt_prompt_len"}


def test_check_meta_refuses_other_lang_mode_or_tokenizer(prepared_vi, tiny_llama):
    _, out, tok = prepared_vi
    meta = pd.load_prepared(out).meta
    assert meta["lang"] == "vi" and meta["mode"] == "parallel" and meta["tokenizer_sha256"] == tok.sha256
    assert meta["max_len"] == 512 and meta["template"] == pd.TEMPLATE_ID and meta["format_version"] == 2
    pd.check_meta(meta, "vi", "parallel", tok.sha256, out)  # fits: no error
    other_sha = "0" * 64
    for args, expected in [(("zh", "parallel", tok.sha256), "lang='vi'"),
                           (("vi", "sft", tok.sha256), "mode='parallel'"),
                           (("vi", "parallel", other_sha), "another tokenizer")]:
        with pytest.raises(SystemExit) as stop:
            pd.check_meta(meta, *args, out)
        assert expected in str(stop.value) and str(out) in str(stop.value) and "\n" not in str(stop.value)


def test_meta_holds_what_an_audit_needs_and_no_field_nothing_reads(prepared_vi, tokenizer_dir,
                                                                   tmp_path):
    _, out, _ = prepared_vi
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta) == {"format_version", "created_by", "lang", "mode", "num_examples",
                         "tokenizer_sha256", "bos_id", "max_len", "overlong", "template", "counts",
                         "sources"}
    sha256 = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    assert meta["tokenizer_sha256"] == sha256(tokenizer_dir / "tokenizer.model")
    for side, name in (("en", "alpaca_en.json"), ("tgt", "alpaca_vi.json")):
        source = tmp_path / name
        assert meta["sources"][side] == {"path": str(source), "sha256": sha256(source)}


def test_load_prepared_damaged_directories(prepared_vi, tmp_path):
    _, out, _ = prepared_vi
    with pytest.raises(SystemExit, match="prepare_data.py"):
        pd.load_prepared(tmp_path / "nothing")

    def damaged(edit):
        copy = tmp_path / f"copy{len(list(tmp_path.glob('copy*')))}"
        shutil.copytree(out, copy)
        edit(copy)
        return copy

    def set_meta(key, value):
        def edit(d):
            meta = json.loads((d / "meta.json").read_text())
            meta[key] = value
            (d / "meta.json").write_text(json.dumps(meta))
        return edit

    cases = [
        (lambda d: (d / "y_tgt.ids.npy").unlink(), "y_tgt.ids.npy: missing"),
        (set_meta("format_version", 99), "format_version=99"),
        (set_meta("max_len", None), "max_len=None"),
        (lambda d: (d / "meta.json").write_text("{not json"), "not valid JSON"),
        (lambda d: np.save(d / "x_en.offsets.npy", np.load(d / "x_en.offsets.npy")[:-1]), "damaged"),
        (lambda d: np.save(d / "x_tgt.ids.npy", np.load(d / "x_tgt.ids.npy")[:-3]), "damaged"),
        (lambda d: (d / "en_spans.npy").write_bytes(b"garbage"), "en_spans.npy: unreadable"),
    ]
    for edit, expected in cases:
        copy = damaged(edit)
        with pytest.raises(SystemExit) as stop:
            pd.load_prepared(copy)
        assert expected in str(stop.value) and "\n" not in str(stop.value)
        assert expected == "not valid JSON" or f"--overwrite --out {copy}" in str(stop.value)


# ---------------------------------------------------------------------------------------------------------------------
# The bundled sample


@pytest.mark.parametrize("lang", ["vi", "zh", "ar"])
def test_bundled_sample_is_clean_and_aligned(lang, tiny_llama, tmp_path_factory):
    sample = ROOT / "data" / "sample"
    files = [sample / "alpaca_en.json", sample / f"alpaca_{lang}.json"]
    assert all(f.is_file() for f in files), f"bundled sample missing: {files}"
    out = tmp_path_factory.mktemp("sample_out") / lang
    # Defaults: the bundled files for --lang. The tiny tokenizer knows few zh/ar pieces (byte fallback, like LLaMA-2's
    # poor coverage), which stresses the ratio bounds; a large --max-len because it splits text finely.
    report = pd.main(["--lang", lang, "--tokenizer", str(tiny_llama), "--out", str(out), "--max-len", "4096"])
    n = len(json.loads(files[0].read_text(encoding="utf-8")))
    assert n >= 100 and report["records"] == {"en": n, "tgt": n}
    assert report["dropped"] == {} and report["kept"] == n
    assert report["files"] == {"en": str(files[0]), "tgt": str(files[1])}


def test_report_counts_rows_whose_cut_leaves_lc_no_content_target(tmp_path, tiny_llama):
    """Under the default LC targets (x_en's instruction+input), a cut inside x_en can leave a kept
    pair with no LC target: the report counts them, checked against the untruncated arrays."""
    L = 256
    args = ["--lang", "vi", "--tokenizer", str(tiny_llama)]
    pd.main(args + ["--out", str(tmp_path / "whole"), "--max-len", "4096"])
    report = pd.main(args + ["--out", str(tmp_path / "cut"), "--max-len", str(L)])
    whole, cut = pd.load_prepared(tmp_path / "whole"), pd.load_prepared(tmp_path / "cut")
    content_at = []  # per kept pair: LC positions of x_en's content tokens (x_en's BOS not repeated)
    for i in range(len(cut)):
        full = whole[cut.source_index(i)]
        P = int(full["tgt_prompt_len"])
        content_at.append([P - 1 + q for q, c in enumerate(full["en_content"].tolist()) if c])
    stats = report["sequences"]["lc_content"]
    assert stats["emptied"] == sum(min(at) >= L for at in content_at) > 0
    assert stats["cut_tokens"] == sum(p >= L for at in content_at for p in at)
    assert stats["supervised_tokens"] == sum(map(len, content_at))
