"""DFT steps on data cut at --max-len (prepare_data's default --overlong truncate). x_tgt is never cut,
so running LC/ET on the TFT pass's prompt keys/values (prefix sharing) still gives the losses and every
gradient of separate full passes, on rows cut in tft, lc, et and en, for LLaMA and Gemma-2 (its sliding
window shorter than the rows)."""
import json

import pytest
import torch

import prepare_data as pd
from model import DFTConfig, Tokenizer, Transformer
from test_dft_step import step_results as step

LONG_EN = " ".join(["The capital of France is Paris, and 2 + 2 = 4."] * 6)
LONG_VI = " ".join(["Ăn uống cân bằng và ngủ đủ giấc để giữ gìn sức khỏe."] * 6)
EN = [
    {"instruction": "What is the capital of France?", "input": "",
     "output": "The capital of France is Paris."},
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": LONG_EN},
    {"instruction": "Add the two numbers.", "input": LONG_EN, "output": "4"},
    {"instruction": "What is 2 + 2?", "input": "", "output": "4"},
]
VI = [
    {"instruction": "Thủ đô của Pháp là gì?", "input": "", "output": "Thủ đô của Pháp là Paris."},
    {"instruction": "Hãy đưa ra ba lời khuyên.", "input": "", "output": LONG_VI},
    {"instruction": "Cộng hai số.", "input": "2 và 2", "output": LONG_VI},
    {"instruction": "2 + 2 bằng bao nhiêu?", "input": "", "output": "Bốn."},
]


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def truncated(request, tiny_llama, tiny_gemma2, tmp_path_factory):
    """A tiny model and one batch of every example, prepared with a --max-len that cuts each kind."""
    model_dir = tiny_llama if request.param == "llama" else tiny_gemma2
    root = tmp_path_factory.mktemp("truncated-" + request.param)
    for name, records in (("en", EN), ("vi", VI)):
        (root / f"{name}.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    tok = Tokenizer(model_dir)
    max_len = max(len(tok.encode(pd.format_prompt(r["instruction"], r["input"]))) for r in VI) + 12
    report = pd.main(["--lang", "vi", "--en", str(root / "en.json"), "--tgt", str(root / "vi.json"),
                      "--tokenizer", str(model_dir), "--out", str(root / "data"),
                      "--max-len", str(max_len)])
    data = pd.load_prepared(root / "data")
    assert len(data) == len(EN)
    batch = pd.collate([data[i] for i in range(len(data))], tok.pad_id)
    for kind in ("tft", "lc", "et", "en"):                       # cut rows and whole rows in every kind
        row_lengths = batch[f"{kind}_mask"].sum(1)
        assert report["sequences"][kind]["truncated"] > 0 and (row_lengths == max_len).any(), kind
        assert (row_lengths < max_len).any(), kind
    assert len(set(batch["tgt_prompt_len"].tolist())) > 1
    return Transformer.from_pretrained(model_dir), batch


@pytest.mark.parametrize("overrides", [{}, {"lc_content_only": False}])
def test_prefix_sharing_equals_separate_passes_on_truncated_rows(truncated, overrides):
    model, batch = truncated
    shared, shared_grads = step(model, batch, "dft-logits", DFTConfig(lc_layer=1, et_layer=3, **overrides))
    plain, plain_grads = step(model, batch, "dft-logits",
                              DFTConfig(lc_layer=1, et_layer=3, prefix_share=False, **overrides))
    assert all(float(plain[k]) > 0 for k in ("tft", "lc", "et"))
    for k in plain:
        torch.testing.assert_close(shared[k], plain[k], atol=1e-5, rtol=0, msg=k)
    assert shared_grads.keys() == plain_grads.keys() and len(plain_grads) > 0
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_feature_losses_run_on_cut_english_prompts(truncated):
    """x_en cut at --max-len still marks content tokens, so feature pooling has something in every row."""
    model, batch = truncated
    assert (batch["en_content"].sum(1) > 0).all()
    parts, grads = step(model, batch, "dft-feature", DFTConfig(lc_layer=1, et_layer=3))
    assert all(torch.isfinite(parts[k]) and float(parts[k]) > 0 for k in ("tft", "lc", "et"))
    assert all(torch.isfinite(g).all() for g in grads.values())
