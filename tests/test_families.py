"""The model families beyond the paper's, against transformers (the test-only reference): LLaMA-3.x (llama3 RoPE
scaling, byte-level BPE tokenizer.json with a BOS), Mistral (sliding window on every layer, SentencePiece) and Qwen2
(q/k/v biases, byte-level BPE without BOS). From the Hub's config.json files to logits, tokenizer ids, export, one
DFT step and 2-process FSDP training; plus the tokenizer files of every tiny family and the --make-tiny CLI."""
import copy
import json
import shutil
import subprocess
import sys

import pytest
import tokenizers
import torch

import prepare_data
import test_train
from conftest import ROOT
from model import (CheckpointError, DFTConfig, ModelArgs, Tokenizer, Transformer, count_targets, default_layers,
                   read_args, rope_inv_freq, sample_texts, write_tiny_checkpoint)

transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")
from test_dft_step import ce_sum, hf_logit_lens  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

TOL = 1e-4
NEW_FAMILIES = ("llama3", "mistral", "qwen2")

# The released config.json files (facts copied from the Hub), with what they must give.
LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
              "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
              "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
              "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
              "pretraining_tp": 1, "rms_norm_eps": 1e-05,
              "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"},
              "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256}
LLAMA32_1B = dict(LLAMA31_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                  eos_token_id=128001, tie_word_embeddings=True,
                  rope_scaling=dict(LLAMA31_8B["rope_scaling"], factor=32.0))
LLAMA32_3B = dict(LLAMA32_1B, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, head_dim=128)
MISTRAL_7B_V01 = {"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
                  "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
                  "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
                  "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
                  "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000}
MISTRAL_7B_V03 = dict(MISTRAL_7B_V01, rope_theta=1000000.0, sliding_window=None, vocab_size=32768)
QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
             "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944,
             "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "qwen2",
             "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
             "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
             "torch_dtype": "bfloat16", "use_mrope": False, "use_sliding_window": False, "vocab_size": 152064}
QWEN25_05B = dict(QWEN25_7B, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, max_window_layers=24, sliding_window=32768, tie_word_embeddings=True,
                  max_position_embeddings=32768, vocab_size=151936)
GEMMA2_9B = {"architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": 50.0, "bos_token_id": 2,
             "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
             "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584, "intermediate_size": 14336,
             "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 16,
             "num_hidden_layers": 42, "num_key_value_heads": 8, "pad_token_id": 0, "query_pre_attn_scalar": 256,
             "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
             "vocab_size": 256000}
GEMMA2_27B = dict(GEMMA2_9B, hidden_size=4608, intermediate_size=36864, num_attention_heads=32, num_hidden_layers=46,
                  num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144)
GEMMA2_2B = dict(GEMMA2_9B, hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_hidden_layers=26,
                 num_key_value_heads=4)

# name -> (config.json, (family, head_dim, query scale, tied, qkv bias, window, layers using it, eos), (i, j) by hand:
# i = max(1, round(2N/32)), j = round(15N/32); Gemma-2 round(2N/26), round(12N/26))
HUB = {
    "Llama-3.1-8B-Instruct": (LLAMA31_8B, ("llama", 128, 128 ** -0.5, False, False, None, 0, 128001), (2, 15)),
    "Llama-3.2-1B": (LLAMA32_1B, ("llama", 64, 64 ** -0.5, True, False, None, 0, 128001), (1, 8)),
    "Llama-3.2-3B": (LLAMA32_3B, ("llama", 128, 128 ** -0.5, True, False, None, 0, 128001), (2, 13)),
    "Mistral-7B-v0.1": (MISTRAL_7B_V01, ("mistral", 128, 128 ** -0.5, False, False, 4096, 32, 2), (2, 15)),
    "Mistral-7B-v0.3": (MISTRAL_7B_V03, ("mistral", 128, 128 ** -0.5, False, False, None, 0, 2), (2, 15)),
    "Qwen2.5-7B": (QWEN25_7B, ("qwen2", 128, 128 ** -0.5, False, True, None, 0, 151643), (2, 13)),
    "Qwen2.5-0.5B": (QWEN25_05B, ("qwen2", 64, 64 ** -0.5, True, True, None, 0, 151643), (2, 11)),
    "Gemma-2-2B": (GEMMA2_2B, ("gemma2", 256, 256 ** -0.5, True, False, 4096, 13, 1), (2, 12)),
    "Gemma-2-9B": (GEMMA2_9B, ("gemma2", 256, 256 ** -0.5, True, False, 4096, 21, 1), (3, 19)),
    "Gemma-2-27B": (GEMMA2_27B, ("gemma2", 128, 144 ** -0.5, True, False, 4096, 23, 1), (4, 21)),
}

TEXTS = {"en": "Give three tips for staying healthy. The capital of France is Paris; 2 + 2 = 4.",
         "vi": "Hãy đưa ra ba lời khuyên để giữ gìn sức khỏe.\n\n### Response: Ăn uống cân bằng!",
         "zh": "给出三个保持健康的建议。均衡饮食，保证充足的睡眠（约8小时）。",
         "ar": "قدم ثلاث نصائح للحفاظ على الصحة. تناول نظاما غذائيا متوازنا ✓"}


def fields(args: ModelArgs):
    sliding = sum(args.sliding_layers) if args.sliding_window else 0
    return (args.family, args.head_dim, args.query_scale or args.head_dim ** -0.5, args.tie_embeddings,
            args.qkv_bias, args.sliding_window if sliding else None, sliding, args.eos_id)


@pytest.mark.parametrize("name", list(HUB))
def test_hub_config_files_in_both_spellings(name):
    """The released files (top-level rope_theta + rope_scaling) and transformers' re-spelling of them
    (rope_parameters, layer_types, Qwen2's window dropped when unused) give the same model."""
    cfg, expected, layers = HUB[name]
    args = ModelArgs.from_hf_config(cfg)
    assert fields(args) == expected
    hf = transformers.AutoConfig.for_model(**cfg)
    hf_head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads    # Qwen2 has none
    assert (args.head_dim, args.n_kv_heads, args.tie_embeddings) == (hf_head_dim, hf.num_key_value_heads,
                                                                      hf.tie_word_embeddings)
    assert "rope_parameters" in hf.to_dict() and "rope_scaling" not in hf.to_dict()
    respelled = ModelArgs.from_hf_config(hf.to_dict())
    for key in ("family", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size",
                "rope_theta", "rope_scaling", "tie_embeddings", "qkv_bias", "sliding_window", "sliding_layers",
                "query_scale", "attn_softcap", "final_softcap", "eos_id"):
        assert getattr(respelled, key) == getattr(args, key), key
    assert default_layers(args.n_layers, args.family) == layers


@pytest.mark.parametrize("cfg", [LLAMA31_8B, LLAMA32_1B], ids=["3.1-8B", "3.2-1B"])
def test_llama3_frequencies_equal_transformers(cfg):
    args = ModelArgs.from_hf_config(cfg)
    expected, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](transformers.AutoConfig.for_model(**cfg), "cpu")
    assert attention_factor == 1.0
    torch.testing.assert_close(rope_inv_freq(args), expected, rtol=1e-6, atol=0)
    plain = rope_inv_freq(ModelArgs.from_hf_config(dict(cfg, rope_scaling=None)))
    assert (plain != expected).sum() > len(plain) // 2             # the rescaling moves most frequencies


@pytest.mark.parametrize("changes,needle", [
    ({"model_type": "mixtral"}, "model_type='mixtral'"),
    ({"model_type": "gemma3"}, "model_type='gemma3'"),
    ({"use_sliding_window": True}, "use_sliding_window=True"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
     "rope_scaling.rope_type='yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}}, "rope_parameters.rope_type"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
])
def test_unsupported_qwen2_fields_are_one_line(changes, needle):
    with pytest.raises(CheckpointError) as info:
        ModelArgs.from_hf_config(dict(QWEN25_7B, **changes), "Qwen2.5-7B/config.json")
    assert needle in str(info.value) and "Qwen2.5-7B/config.json" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("cfg,needle", [
    (dict(LLAMA31_8B, rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}), "low_freq_factor"),
    (dict(LLAMA31_8B, attention_bias=True), "attention_bias=True"),
    (dict(MISTRAL_7B_V01, rope_scaling={"rope_type": "llama3", **LLAMA31_8B["rope_scaling"]}),
     "model_type='mistral'"),
])
def test_unsupported_llama_and_mistral_fields_are_one_line(cfg, needle):
    with pytest.raises(CheckpointError) as info:
        ModelArgs.from_hf_config(cfg)
    assert needle in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# Tiny checkpoints of the new families, and the same weights made strong

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: write_tiny_checkpoint(root / family, family, sample_texts()) for family in NEW_FAMILIES}


def strengthen(model: Transformer, seed: int = 0) -> Transformer:
    """Weights far from the tiny init (as test_model.hf_tiny's): RoPE, the window and the biases then move the
    logits by far more than the tolerance, so a mistake in any of them shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 - model.args.norm_offset + 0.3 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return model


@pytest.fixture(scope="module")
def strong(tiny, tmp_path_factory):
    """family -> (our strengthened model, transformers' model read from our export of it)."""
    pairs = {}
    for family, path in tiny.items():
        ours = strengthen(Transformer.from_pretrained(path))
        export = tmp_path_factory.mktemp("export") / family
        ours.save_pretrained(export)
        ref = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
        ref.config._attn_implementation = "eager"
        pairs[family] = (ours, ref)
    return pairs


def right_padded(lengths, vocab, pad_id, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((len(lengths), max(lengths)), pad_id)
    mask = torch.zeros_like(tokens)
    for b, n in enumerate(lengths):
        tokens[b, :n] = torch.randint(0, vocab, (n,), generator=g)
        mask[b, :n] = 1
    return tokens, mask


def without_the_feature(model: Transformer) -> Transformer:
    """The same weights minus the family's feature under test: llama3 scaling, Mistral's window, Qwen2's biases."""
    args = copy.deepcopy(model.args)
    args.rope_scaling, args.sliding_window = None, None
    other = Transformer(args)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
    return other.eval()


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_logits_equal_transformers_on_a_right_padded_batch(strong, family):
    ours, ref = strong[family]
    lengths = [40, 23, 9]                       # Mistral: longer than its window of 16
    tokens, mask = right_padded(lengths, ours.args.vocab_size, 0)
    with torch.no_grad():
        got = ours(tokens, attention_mask=mask)
        expected = ref(tokens, attention_mask=mask).logits
        plain = without_the_feature(ours)(tokens, attention_mask=mask)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(got[b, :n], expected[b, :n], atol=TOL, rtol=0)
    assert (plain[0, :40] - expected[0, :40]).abs().max() > 100 * TOL     # the comparison sees the feature


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_tiny_checkpoint_files_load_in_transformers(tiny, family):
    ours = Transformer.from_pretrained(tiny[family])
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny[family]).eval()
    ref.config._attn_implementation = "eager"
    tokens = torch.tensor([Tokenizer(tiny[family]).encode(TEXTS["vi"] * 3)])
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(tokens).logits, atol=TOL, rtol=0)
    assert read_args(tiny[family]).family == {"llama3": "llama"}.get(family, family)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_sharded_export_reloads_in_transformers_and_here(strong, tmp_path, family):
    ours, _ = strong[family]
    ours.save_pretrained(tmp_path, max_shard_bytes=40_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    back.config._attn_implementation = "eager"
    tokens = torch.randint(0, ours.args.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, ours(tokens), atol=TOL, rtol=0)
        torch.testing.assert_close(Transformer.from_pretrained(tmp_path)(tokens), ours(tokens), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers: ours against transformers' AutoTokenizer on the tiny models' files, every family

@pytest.fixture(scope="module")
def tokenizer_dirs(tiny, tiny_llama, tiny_gemma2):
    return dict(tiny, llama=tiny_llama, gemma2=tiny_gemma2)


@pytest.mark.parametrize("family", ["llama", "gemma2"] + list(NEW_FAMILIES))
def test_tokenizer_ids_equal_transformers(tokenizer_dirs, family):
    path = tokenizer_dirs[family]
    ours = Tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(path)      # no protobuf in this environment
    assert ours.path.name == ("tokenizer.json" if family in ("llama3", "qwen2") else "tokenizer.model")
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (theirs.bos_token_id, theirs.eos_token_id, len(theirs))
    assert ours.pad_id == (theirs.pad_token_id if theirs.pad_token_id is not None else
                           0 if family in ("llama", "mistral") else ours.eos_id)     # a filler where there is none
    assert (ours.bos_id is None) == (family == "qwen2")
    for lang, text in TEXTS.items():
        ids = ours.encode(text, bos=True)
        assert ids == theirs(text, add_special_tokens=True).input_ids, lang
        assert ours.encode(text, bos=False) == theirs(text, add_special_tokens=False).input_ids, lang
        assert [ours.piece(i) for i in ids] == theirs.convert_ids_to_tokens(ids), lang
        assert ours.decode(ours.encode(text) + [ours.eos_id]) == text


def byte_level_bytes(token: str) -> bytes:
    """The bytes a byte-level BPE token stands for: GPT-2's table keeps the printable bytes 33-126, 161-172 and
    174-255 as their own characters and writes the others as chr(256 + k), k counting them in order."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in kept]
    table = {chr(b): b for b in kept} | {chr(256 + k): b for k, b in enumerate(moved)}
    return bytes(table[c] for c in token)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_byte_level_offsets_are_the_characters_of_each_tokens_bytes(tiny, family):
    tok = Tokenizer(tiny[family])
    text = " ".join(TEXTS.values())
    ids, spans = tok.encode_with_offsets(text, bos=True)
    assert ids == tok.encode(text, bos=True)
    head = 0 if tok.bos_id is None else 1
    assert spans[:head] == [(0, 0)] * head
    char_at = [k for k, ch in enumerate(text) for _ in ch.encode()]      # byte offset -> character offset
    expected, pos = [], 0
    for token_id in ids[head:]:
        size = len(byte_level_bytes(tok.piece(token_id)))
        expected.append((char_at[pos], char_at[pos + size - 1] + 1))
        pos += size
    assert pos == len(text.encode()) and spans[head:] == expected
    # Some character's bytes are split between two tokens (the tiny vocabulary lacks whole Chinese characters).
    assert any(start < end_before for (_, end_before), (start, _) in zip(spans[head:], spans[head + 1:]))


def test_tokenizer_json_bos_from_its_post_processor_and_eos_fallback(tiny, tmp_path):
    """A post-processor that adds more than one BOS is refused in one line; without an eos_token in
    tokenizer_config.json the EOS is generation_config.json's first eos_token_id (LLaMA-3.1-Instruct lists three)."""
    path = tmp_path / "llama3"
    shutil.copytree(tiny["llama3"], path)
    bpe = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    bpe.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, bpe.token_to_id(bos)), (eos, bpe.token_to_id(eos))])
    bpe.save(str(path / "tokenizer.json"))
    with pytest.raises(CheckpointError) as info:
        Tokenizer(path)
    assert "tokenizer.json" in str(info.value) and "post_processor" in str(info.value)

    shutil.copy(tiny["llama3"] / "tokenizer.json", path / "tokenizer.json")
    end_of_turn = Tokenizer(path).bpe.token_to_id("<|eot_id|>")
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_turn, 5]}))
    assert Tokenizer(path).eos_id == end_of_turn


def test_prepared_data_made_with_another_eos_is_refused(tiny, tmp_path):
    """tokenizer.json leaves the EOS to tokenizer_config.json: data prepared before the EOS changed
    ends every response with the old one, so the check against the model's tokenizer refuses it."""
    path = tmp_path / "llama3"
    shutil.copytree(tiny["llama3"], path)
    prepare_data.main(["--lang", "vi", "--tokenizer", str(path), "--out", str(tmp_path / "vi")])
    meta = prepare_data.load_prepared(tmp_path / "vi").meta
    prepare_data.check_meta(meta, "vi", "parallel", Tokenizer(path).sha256, tmp_path / "vi")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|eot_id|>"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="tokenizer"):
        prepare_data.check_meta(meta, "vi", "parallel", Tokenizer(path).sha256, tmp_path / "vi")


# ---------------------------------------------------------------------------------------------------------------------
# Prepared data and one DFT step

@pytest.fixture(scope="module")
def prepared(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    for family, path in tiny.items():
        # --max-len beyond the longest pair: nothing cut, so every sequence can be compared whole
        prepare_data.main(["--lang", "vi", "--tokenizer", str(path), "--out", str(root / family), "--max-len", "2048"])
    return {family: prepare_data.load_prepared(root / family) for family in tiny}


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_prepared_sequences_of_the_new_families(tiny, prepared, family):
    """lc = x_tgt ; x_en without its BOS; a tokenizer without BOS (Qwen2) keeps all of x_en; the content masks
    mark exactly the English instruction and input, whatever the tokenizer kind."""
    tok, data = Tokenizer(tiny[family]), prepared[family]
    english = json.loads((ROOT / "data" / "sample" / "alpaca_en.json").read_text(encoding="utf-8"))
    head = 0 if tok.bos_id is None else 1
    for i in range(0, len(data), 7):
        ex, record = data[i], english[data.source_index(i)]
        P = ex["tgt_prompt_len"]
        x_en = tok.encode(prepare_data.format_prompt(record["instruction"], record["input"]), bos=True)
        assert ex["en_tokens"].tolist() == x_en and ex["lc_tokens"][P:].tolist() == x_en[head:]
        assert len(ex["lc_tokens"]) == P + len(x_en) - head
        content = tok.decode(ex["lc_labels"][ex["lc_content"] == 1].tolist())
        assert content == tok.decode(ex["en_tokens"][ex["en_content"] == 1].tolist())
        assert content.replace("\n", "").replace(" ", "") == (record["instruction"] + record["input"]).replace(
            "\n", "").replace(" ", "")
        assert tok.decode(ex["lc_tokens"][P:].tolist()).startswith("Below is an instruction")


def test_word_marker_is_dropped_only_for_sentencepiece(tiny, tiny_llama, tmp_path):
    """U+2581 is SentencePiece's own space mark (its span mapping cannot place it), a plain character to a
    byte-level BPE: the record is dropped for the first kind and kept, spans intact, for the second."""
    rows = {lang: json.loads((ROOT / "data" / "sample" / f"alpaca_{lang}.json").read_text(encoding="utf-8"))[:6]
            for lang in ("en", "vi")}
    rows["vi"][2] = dict(rows["vi"][2], input="Xin chào\u2581thế giới")
    for lang, records in rows.items():
        (tmp_path / f"{lang}.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    files = ["--lang", "vi", "--en", str(tmp_path / "en.json"), "--tgt", str(tmp_path / "vi.json")]
    for name, model_dir in (("llama", tiny_llama), ("qwen2", tiny["qwen2"])):
        report = prepare_data.main(files + ["--tokenizer", str(model_dir), "--out", str(tmp_path / name)])
        if name == "llama":
            assert report["kept"] == 5 and report["dropped"] == {"word_marker": 1}
            continue
        assert report["kept"] == 6
        ex, tok = prepare_data.load_prepared(tmp_path / name)[2], Tokenizer(model_dir)
        content = tok.decode(ex["tft_tokens"][ex["tgt_content"] == 1].tolist())
        assert content.replace(" ", "").replace("\n", "") == (rows["vi"][2]["instruction"] + "Xin chào\u2581thế giới"
                                                            ).replace(" ", "")


def prepared_batch(data, n=3):
    """The n shortest examples (their prompt lengths differ), collated right-padded."""
    shortest = sorted(range(len(data)), key=lambda i: len(data[i]["tft_tokens"]))[:n]
    return prepare_data.collate([data[i] for i in shortest], pad_id=0)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_dft_logits_step_equals_transformers(strong, prepared, family):
    """LC/ET through the shared-prompt path (prefix sharing on) against transformers' hidden states of the full
    [x_tgt ; x_en] and [x_tgt ; y_en] sequences, put through its own final norm and head."""
    ours, ref = strong[family]
    batch = prepared_batch(prepared[family])
    assert len(set(batch["tgt_prompt_len"].tolist())) > 1
    cfg = DFTConfig(lc_layer=1, et_layer=2, prefix_share=True)
    with torch.no_grad():
        out = ours.dft_step(batch, "dft-logits", cfg, count_targets(batch, "dft-logits", cfg))
        tft = ref(batch["tft_tokens"], attention_mask=batch["tft_mask"]).logits
        h_lc = ref(batch["lc_tokens"], attention_mask=batch["lc_mask"], output_hidden_states=True).hidden_states[1]
        h_et = ref(batch["et_tokens"], attention_mask=batch["et_mask"], output_hidden_states=True).hidden_states[2]
    lc_labels = batch["lc_labels"].masked_fill(batch["lc_content"] == 0, -100)
    for part, logits, labels in (("tft", tft, batch["tft_labels"]), ("lc", hf_logit_lens(ref, h_lc), lc_labels),
                                 ("et", hf_logit_lens(ref, h_et), batch["et_labels"])):
        expected = ce_sum(logits, labels) / (labels != -100).sum()
        torch.testing.assert_close(out[part], expected, atol=1e-5, rtol=1e-6, msg=part)


# ---------------------------------------------------------------------------------------------------------------------
# 2-process FSDP training (train.py's own equality test, on a Qwen2 checkpoint: BPE without BOS, biases)

@pytest.fixture(scope="module")
def qwen2_setup(tmp_path_factory):
    """The layout test_train's runs read: ROOT/{en,vi}.json, ROOT/qwen2 (model), ROOT/qwen2-vi (prepared data)."""
    root = tmp_path_factory.mktemp("train-qwen2")
    en, vi = test_train.alpaca_pairs()
    (root / "en.json").write_text(json.dumps(en, ensure_ascii=False), encoding="utf-8")
    (root / "vi.json").write_text(json.dumps(vi, ensure_ascii=False), encoding="utf-8")
    texts = [prepare_data.PROMPT_WITH_INPUT, prepare_data.PROMPT_NO_INPUT] * 4 + [
        r[k] for r in en + vi for k in ("instruction", "input", "output") if r[k]]
    write_tiny_checkpoint(root / "qwen2", "qwen2", texts, vocab_size=320)
    # Qwen2 also ships its BPE as vocab.json + merges.txt (transformers' slow tokenizer reads them).
    (root / "qwen2" / "vocab.json").write_text('{"a": 0}')
    (root / "qwen2" / "merges.txt").write_text("#version: 0.2\n")
    prepare_data.main(["--lang", "vi", "--en", str(root / "en.json"), "--tgt", str(root / "vi.json"),
                       "--tokenizer", str(root / "qwen2"), "--out", str(root / "qwen2-vi")])
    return root


def test_two_processes_equal_one_on_qwen2(qwen2_setup):
    test_train.test_two_processes_equal_one(qwen2_setup, "dft-logits", "qwen2")
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        exported = qwen2_setup / "two-dft-logits-qwen2" / "final" / name
        assert exported.read_bytes() == (qwen2_setup / "qwen2" / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------------------------------
# The --make-tiny CLI

def make_tiny(*argv):
    return subprocess.run([sys.executable, str(ROOT / "model.py"), "--make-tiny", *map(str, argv)],
                          capture_output=True, text=True, timeout=300)


def test_make_tiny_refuses_a_dir_that_holds_a_checkpoint(tmp_path):
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "notes.txt").write_text("mine")                   # other files are no checkpoint: allowed
    assert make_tiny(out, "--family", "qwen2").returncode == 0
    weights = (out / "model.safetensors").read_bytes()
    again = make_tiny(out, "--family", "llama3", "--seed", "1")
    assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert str(out) in again.stderr and "already holds a checkpoint" in again.stderr
    assert (out / "model.safetensors").read_bytes() == weights and read_args(out).family == "qwen2"
    assert (out / "notes.txt").read_text() == "mine" and not (tmp_path / "tiny.partial").exists()

    only_weights = tmp_path / "weights-only"
    only_weights.mkdir()
    (only_weights / "model-00001-of-00002.safetensors").write_bytes(b"")
    refused = make_tiny(only_weights, "--family", "mistral")
    assert refused.returncode == 1 and "model-00001-of-00002.safetensors" in refused.stderr


def test_make_tiny_help_shows_the_defaults():
    shown = subprocess.run([sys.executable, str(ROOT / "model.py"), "--help"], capture_output=True, text=True,
                           timeout=120).stdout
    for default in ("(default: llama)", "(default: 2048)", "(default: 0)", "llama3", "qwen2", "mistral"):
        assert default in shown, default
