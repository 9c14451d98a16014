"""model.py against an independent reference: transformers' LlamaForCausalLM / Gemma2ForCausalLM on tiny random
weights (fp32), plus checkpoint IO, padding, the KV cache and bad inputs."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module

import model as model_module
from conftest import ROOT
from model import (CheckpointError, ModelArgs, Tokenizer, Transformer, load_weights, read_args,
                   write_tiny_checkpoint)

transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference "
                                   "(pip install -r tests/requirements.txt)")

TOL = 1e-4


def hf_tiny(family, **overrides):
    """A tiny random transformers model with every weight (norms included) perturbed, so no part can be a no-op."""
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                       max_position_embeddings=256, rms_norm_eps=1e-5,
                                       rope_parameters={"rope_type": "default", "rope_theta": 500.0}, **overrides)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=97,
                                        max_position_embeddings=256, query_pre_attn_scalar=24, sliding_window=8,
                                        attn_logit_softcapping=5.0, final_logit_softcapping=3.0, **overrides)
        model = transformers.Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.15) + (1.0 if "norm" in name and family == "llama" else 0.0))
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def pair(request, tmp_path_factory):
    """(reference model, its checkpoint dir, our model loaded from that dir)."""
    family = request.param
    ref = hf_tiny(family)
    path = tmp_path_factory.mktemp(family)
    ref.save_pretrained(path)
    return ref, path, Transformer.from_pretrained(path)


def test_logits_match_reference(pair):
    ref, _, ours = pair
    tokens = torch.randint(0, 97, (2, 40))            # Gemma-2: longer than its sliding window of 8
    with torch.no_grad():
        expected = ref(tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_hidden_at_matches_reference_hidden_states(pair):
    ref, _, ours = pair
    tokens = torch.randint(0, 97, (2, 24))
    n = ours.args.n_layers
    with torch.no_grad():
        ref_states = ref(tokens, output_hidden_states=True).hidden_states
        assert len(ref_states) == n + 1                 # embeddings, then one entry per block
        for k in range(1, n):                           # the reference's last entry has the final norm applied
            torch.testing.assert_close(ours.hidden_at(tokens, k), ref_states[k], atol=TOL, rtol=0)
        both = ours.hidden_at(tokens, (1, n - 1))
        torch.testing.assert_close(both[1], ref_states[n - 1], atol=TOL, rtol=0)
        torch.testing.assert_close(ours.head_logits(ours.hidden_at(tokens, n)), ref(tokens).logits, atol=TOL, rtol=0)


def test_hidden_at_runs_only_the_blocks_it_needs(pair):
    _, _, ours = pair
    ran = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in enumerate(ours.layers)]
    try:
        ours.hidden_at(torch.randint(0, 97, (1, 5)), 2)
    finally:
        for h in hooks:
            h.remove()
    assert ran == [0, 1]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_unpadded_rows(pair, side):
    ref, _, ours = pair
    lengths = [23, 9, 16]
    rows = [torch.randint(1, 97, (n,)) for n in lengths]
    T = max(lengths)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        tokens[b, sl], mask[b, sl] = r, 1
    with torch.no_grad():
        got = ours(tokens, attention_mask=mask)
        hidden = ours.hidden_at(tokens, 2, attention_mask=mask)
        for b, r in enumerate(rows):
            sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
            out = ref(r[None], output_hidden_states=True)
            torch.testing.assert_close(got[b, sl], out.logits[0], atol=TOL, rtol=0)
            torch.testing.assert_close(hidden[b, sl], out.hidden_states[2][0], atol=TOL, rtol=0)


def padded_batch(lengths, sides, T):
    """Random rows of the given lengths, each padded on its own side ("right" or "left") to T."""
    tokens = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, (n, side) in enumerate(zip(lengths, sides)):
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        tokens[b, sl], mask[b, sl] = torch.randint(1, 97, (n,)), 1
    return tokens, mask


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """flex_attention on CPU runs eagerly and unfused (it materialises the scores), and torch refuses its backward
    there only for want of a fused CPU kernel: lift that refusal so gradients can be compared. Returns the list of
    flex calls, so a test cannot pass without flex having run."""
    calls = []

    def counted_flex(*args, **kwargs):
        calls.append(kwargs["block_mask"])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_module.flex_attention(*args, **kwargs)

    monkeypatch.setattr(flex_module, "_validate_device", lambda query, key, value: None)
    monkeypatch.setattr(model_module, "flex_attention", counted_flex)
    return calls


def masks_seen(model, fn):
    """The kind of mask block 1's attention got in each call fn makes: "causal" (None: SDPA's causal kernels),
    "flex" (a BlockMask) or "dense" (a boolean tensor: the reference attention)."""
    seen = []

    def record(module, args):
        mask = args[3]
        seen.append("causal" if mask is None else "flex" if isinstance(mask, flex_module.BlockMask) else "dense")

    hook = model.layers[0].attention.register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            fn()
    finally:
        hook.remove()
    return seen


def real_logits_and_grads(model, tokens, mask):
    """The real tokens' logits and the gradients of a loss on them."""
    model.zero_grad()
    logits = model(tokens, attention_mask=mask)[mask.bool()]
    logits.logsumexp(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return logits.detach(), grads


def assert_same_results(got, expected):
    """(values, gradients) equal to fp32 round-off; values a tensor or a dict of tensors (a DFT step's parts)."""
    (values, grads), (values_ref, grads_ref) = got, expected
    if isinstance(values_ref, dict):
        for k in values_ref:
            torch.testing.assert_close(values[k], values_ref[k], atol=1e-5, rtol=0, msg=k)
    else:
        torch.testing.assert_close(values, values_ref, atol=1e-5, rtol=0)
    assert grads.keys() == grads_ref.keys()
    for n in grads_ref:
        torch.testing.assert_close(grads[n], grads_ref[n], atol=1e-5, rtol=1e-4, msg=n)


def test_attention_dispatch(pair, flex_on_cpu, monkeypatch):
    """Right-padded (or unpadded) LLaMA batches take SDPA's causal path with no mask; whatever needs a mask (left
    padding, Gemma-2's softcap and window) takes flex when use_flex is set, the reference otherwise (the default on
    CPU); decoding with a cache always takes the reference."""
    _, _, ours = pair
    gemma = ours.args.attn_softcap is not None
    right = padded_batch([20, 9], ["right", "right"], 20)
    left = padded_batch([20, 9], ["right", "left"], 20)

    def seen(use_flex):
        monkeypatch.setattr(ours, "use_flex", use_flex)
        cache = ours.init_cache(2, 24)
        return masks_seen(ours, lambda: [ours(right[0]), ours(*right), ours(*left),
                                         ours(*right, cache=cache), ours(right[0][:, :1], cache=cache)])

    masked = "dense"
    assert seen(None) == ([masked] * 3 if gemma else ["causal", "causal", masked]) + ["dense", "dense"]
    masked = "flex"
    assert seen(True) == ([masked] * 3 if gemma else ["causal", "causal", masked]) + ["dense", "dense"]
    assert len(flex_on_cpu) == ours.args.n_layers * (3 if gemma else 1)


def test_right_padded_causal_path_equals_the_masked_path(pair, monkeypatch):
    """The causal path of a right-padded batch leaves every real token's logits and the gradients of a loss on them
    as the explicitly masked path gives them (forced here by denying the batch is right-padded)."""
    _, _, ours = pair
    tokens, mask = padded_batch([23, 9, 16], ["right"] * 3, 23)
    gemma = ours.args.attn_softcap is not None           # its softcap and window always need the mask
    assert masks_seen(ours, lambda: ours(tokens, attention_mask=mask)) == ["dense" if gemma else "causal"]
    fast = real_logits_and_grads(ours, tokens, mask)
    monkeypatch.setattr(model_module, "is_right_padded", lambda *masks: False)
    assert_same_results(fast, real_logits_and_grads(ours, tokens, mask))


def test_flex_attention_equals_the_reference(pair, flex_on_cpu, monkeypatch):
    """flex_attention (a block mask from the same rule, Gemma-2's softcap as a score_mod) gives the reference's
    logits and gradients in fp32: rows padded on the right and on the left, 40 tokens (Gemma-2: past its window
    of 8; not a multiple of flex's 128-token blocks)."""
    _, _, ours = pair
    tokens, mask = padded_batch([40, 13, 27], ["right", "right", "left"], 40)
    expected = real_logits_and_grads(ours, tokens, mask)
    monkeypatch.setattr(ours, "use_flex", True)
    got = real_logits_and_grads(ours, tokens, mask)
    assert len(flex_on_cpu) == ours.args.n_layers
    assert_same_results(got, expected)


def test_sharded_checkpoint_loads(tmp_path):
    ref = hf_tiny("llama")
    ref.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(tokens).logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("shard_bytes", [2**30, 40_000])
def test_our_export_loads_in_transformers(pair, tmp_path, shard_bytes):
    ref, _, ours = pair
    out = tmp_path / "export"
    ours.save_pretrained(out, max_shard_bytes=shard_bytes)
    assert not Path(str(out) + ".tmp").exists()
    assert (out / "model.safetensors.index.json").is_file() == (shard_bytes < 2**30)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, ref(tokens).logits, atol=TOL, rtol=0)


def test_cached_decoding_equals_uncached(pair):
    _, _, ours = pair
    prompts = [torch.randint(1, 97, (n,)) for n in (11, 5)]
    T0, steps = 11, 14                                 # Gemma-2: decoding runs past the sliding window
    tokens = torch.zeros(2, T0, dtype=torch.long)
    mask = torch.zeros(2, T0, dtype=torch.long)
    for b, p in enumerate(prompts):                    # left-padded, as a batched generator pads
        tokens[b, T0 - len(p):], mask[b, T0 - len(p):] = p, 1
    with torch.no_grad():
        cache = ours.init_cache(2, T0 + steps)
        logits = ours(tokens, attention_mask=mask, cache=cache, last_only=True)[:, -1]
        seq, full_mask = tokens, mask
        for _ in range(steps):
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            full_mask = torch.cat([full_mask, torch.ones(2, 1, dtype=torch.long)], 1)
            logits = ours(nxt, attention_mask=full_mask, cache=cache)[:, -1]
            uncached = ours(seq, attention_mask=full_mask)[:, -1]
            torch.testing.assert_close(logits, uncached, atol=TOL, rtol=0)


def test_bf16_forward_close_to_fp32(pair):
    _, path, ours = pair
    bf16 = Transformer.from_pretrained(path, dtype=torch.bfloat16)
    tokens = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        a, b = ours(tokens), bf16(tokens)
    assert b.dtype == torch.float32                    # logits are an fp32 island
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_meta_build_then_load_weights_equals_from_pretrained(pair):
    _, path, ours = pair
    with torch.device("meta"):
        model = Transformer(read_args(path))
    model.to_empty(device="cpu")
    load_weights(model, path)
    tokens = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ours(tokens), atol=0, rtol=0)


def test_load_weights_under_fsdp_two_processes(tmp_path):
    """torchrun --nproc_per_node 2 (gloo): fully_shard on a meta model, load_weights, logits == from_pretrained."""
    path = tmp_path / "ckpt"
    hf_tiny("gemma2").save_pretrained(path, max_shard_size="60KB")   # tied head + several shards
    script = ROOT / "tests" / "fsdp_load_worker.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(path), str(tmp_path / "logits.pt")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = Transformer.from_pretrained(path)
    tokens = torch.arange(1, 25)[None] % 97
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), expected(tokens),
                                   atol=TOL, rtol=0)
    # The FSDP export (every rank gathers, rank 0 writes) loads back with the same logits.
    back = Transformer.from_pretrained(tmp_path / "export")
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), expected(tokens), atol=0, rtol=0)


def test_tokenizer_round_trip_and_ids(tiny_llama, tiny_gemma2):
    for path, (bos, eos, pad) in ((tiny_llama, (1, 2, 0)), (tiny_gemma2, (2, 1, 0))):
        tok = Tokenizer(path)
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (bos, eos, pad)
        text = "Xin chào! 你好 مرحبا\n### Response: 42 ✓"           # ✓ is unseen: byte fallback
        ids = tok.encode(text, bos=True) + [tok.eos_id]
        assert ids[0] == bos and ids[-1] == eos and tok.encode(text, bos=False) == ids[1:-1]
        assert tok.decode(ids) == text
        assert len(tok.sha256) == 64


def test_tiny_checkpoint_is_official_layout_and_loads_in_transformers(tiny_llama, tiny_gemma2):
    for path in (tiny_llama, tiny_gemma2):
        ours = Transformer.from_pretrained(path)
        ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        ref.config._attn_implementation = "eager"
        tokens = torch.tensor([Tokenizer(path).encode("Hãy đưa ra ba lời khuyên để giữ gìn sức khỏe.")])
        with torch.no_grad():
            torch.testing.assert_close(ours(tokens), ref(tokens).logits, atol=TOL, rtol=0)


def test_make_tiny_cli(tmp_path):
    out = tmp_path / "cli-tiny"
    proc = subprocess.run([sys.executable, str(ROOT / "model.py"), "--make-tiny", str(out), "--family", "gemma2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert read_args(out).family == "gemma2" and (out / "tokenizer.model").is_file()


# --- bad inputs: one clear line naming the file and the field ---------------------------------------------------------

def one_line_error(fn, *needles):
    with pytest.raises(CheckpointError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_missing_config(tmp_path):
    """The fix names the download of the real model, and a tiny random model only under its own name."""
    model_dir = tmp_path / "gemma-2-2b"
    msg = one_line_error(lambda: Transformer.from_pretrained(model_dir), "config.json", "not found",
                         f"huggingface-cli download google/gemma-2-2b --local-dir {model_dir}",
                         "--make-tiny models/tiny-llama")
    assert f"--make-tiny {model_dir}" not in msg


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_model_type_and_rope_scaling(tmp_path):
    hf_tiny("llama").save_pretrained(tmp_path)
    edit_config(tmp_path, model_type="gemma3")
    one_line_error(lambda: Transformer.from_pretrained(tmp_path), "model_type='gemma3'", "config.json")
    edit_config(tmp_path, model_type="llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    one_line_error(lambda: Transformer.from_pretrained(tmp_path), "rope_scaling")
    edit_config(tmp_path, rope_scaling=None, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    one_line_error(lambda: Transformer.from_pretrained(tmp_path), "rope_type='yarn'")


def test_missing_shard_and_wrong_shape(tmp_path):
    ref = hf_tiny("llama")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    shards[-1].unlink()
    one_line_error(lambda: Transformer.from_pretrained(tmp_path / "sharded"), shards[-1].name, "missing")

    ref.save_pretrained(tmp_path / "shape")
    edit_config(tmp_path / "shape", intermediate_size=128)        # the file's MLP weights are 112 wide
    msg = one_line_error(lambda: Transformer.from_pretrained(tmp_path / "shape"), "mlp.gate_proj", "[112, 64]")
    assert "model.layers.2.mlp.down_proj.weight" in msg            # every problem listed, not just the first


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_tiny("llama").save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    state = load_file(f)
    del state["model.norm.weight"]
    state["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(state, f)
    one_line_error(lambda: Transformer.from_pretrained(tmp_path), "missing model.norm.weight",
                   "unexpected model.layers.9.extra.weight")


def test_layers_out_of_range(pair):
    _, _, ours = pair
    with pytest.raises(ValueError, match="layers"):
        ours.hidden_at(torch.zeros(1, 3, dtype=torch.long), ours.args.n_layers + 1)


def test_gemma2_config_fields():
    args = ModelArgs.from_hf_config({"model_type": "gemma2", "hidden_size": 2304, "num_hidden_layers": 26,
                                     "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                                     "intermediate_size": 9216, "vocab_size": 256000, "query_pre_attn_scalar": 256,
                                     "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 4096,
                                     "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0})
    assert args.head_dim == 256 and args.tie_embeddings and args.sliding_layers[:3] == (True, False, True)
    assert args.query_scale == 256 ** -0.5 and args.embed_scale == 2304 ** 0.5


def test_replace_dir_swaps_whole_dirs_and_a_kill_leaves_the_old_one_whole(tmp_path, monkeypatch):
    target = tmp_path / "final"
    for version in ("v1", "v2"):
        staging = tmp_path / f"final.{version}"
        staging.mkdir()
        (staging / "weights").write_text(version)
        model_module.replace_dir(staging, target)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
        assert [p.name for p in target.iterdir()] == ["weights"]
        assert (target / "weights").read_text() == version
    # Killed between the two renames: the old dir is whole, set aside, and the next call tidies up.
    staging = tmp_path / "final.v3"
    staging.mkdir()
    (staging / "weights").write_text("v3")
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (real_rename(a, b) if Path(b).name
                                                     == "final.old" else 1 / 0))
    with pytest.raises(ZeroDivisionError):
        model_module.replace_dir(staging, target)
    assert (tmp_path / "final.old" / "weights").read_text() == "v2"
    monkeypatch.setattr(os, "rename", real_rename)
    model_module.replace_dir(staging, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert (target / "weights").read_text() == "v3"


def test_piece_past_the_vocabulary_names_the_id(tiny_llama):
    """A model's embedding table may be padded past its tokenizer's vocabulary: the logit lens can
    pick such an id and must still show something."""
    tok = Tokenizer(tiny_llama)
    assert tok.piece(1) == "<s>" and tok.piece(tok.vocab_size + 3) == f"<id {tok.vocab_size + 3}>"
    assert tok.piece(-1) == "<id -1>"
