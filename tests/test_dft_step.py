"""model.dft_step against independent references: transformers' hidden states + its own norm and head with
materialised logits (logits losses), separate passes per sequence (feature losses), and training behaviour."""
import gc
import warnings
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import model as model_module
import train
from model import DFTConfig, Transformer, count_targets, default_layers

transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")
from test_model import assert_same_results, flex_on_cpu, hf_tiny, masks_seen  # noqa: E402,F401 (a fixture)

IGNORE_INDEX = -100


def make_example(g, vocab, eos):
    """Random parallel example as token lists: template words are shared, content differs per language."""
    r = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    head, tail = r(3), r(2)                           # template words before and after the content
    tgt_q, en_q = r(int(torch.randint(2, 6, (1,), generator=g))), r(int(torch.randint(2, 6, (1,), generator=g)))
    return dict(x_tgt=[1] + head + tgt_q + tail, tgt_span=(4, 4 + len(tgt_q)),
                x_en=[1] + head + en_q + tail, en_span=(4, 4 + len(en_q)),
                y_tgt=r(int(torch.randint(2, 7, (1,), generator=g))) + [eos],
                y_en=r(int(torch.randint(2, 7, (1,), generator=g))) + [eos])


def make_batch(examples):
    """The batch of prepare_data.collate, built by hand (right-padded, labels shifted)."""
    def pad(rows, value):
        T = max(len(x) for x in rows)
        return torch.tensor([x + [value] * (T - len(x)) for x in rows])

    def seq(prompt, rest, supervised_from):
        tokens = prompt + rest
        labels = [tokens[t + 1] if t + 1 >= supervised_from else IGNORE_INDEX for t in range(len(tokens) - 1)] + [IGNORE_INDEX]
        return tokens, labels

    b = {k: [] for k in ["tft_tokens", "tft_labels", "lc_tokens", "lc_labels", "et_tokens", "et_labels",
                         "en_tokens", "tgt_content", "lc_content", "en_content", "tgt_prompt_len"]}
    for e in examples:
        p = len(e["x_tgt"])
        for kind, rest in (("tft", e["y_tgt"]), ("lc", e["x_en"][1:]), ("et", e["y_en"])):
            tokens, labels = seq(e["x_tgt"], rest, p)
            b[f"{kind}_tokens"].append(tokens)
            b[f"{kind}_labels"].append(labels)
        b["en_tokens"].append(e["x_en"])
        b["tgt_prompt_len"].append(p)
        b["tgt_content"].append([int(e["tgt_span"][0] <= t < e["tgt_span"][1]) for t in range(p + len(e["y_tgt"]))])
        b["en_content"].append([int(e["en_span"][0] <= t < e["en_span"][1]) for t in range(len(e["x_en"]))])
        # label space: position t predicts lc token t+1 = x_en token t+1-(p-1)
        b["lc_content"].append([int(e["en_span"][0] <= t + 1 - (p - 1) < e["en_span"][1])
                                for t in range(len(b["lc_tokens"][-1]))])
    out = {}
    for k, rows in b.items():
        if k == "tgt_prompt_len":
            out[k] = torch.tensor(rows)
        else:
            out[k] = pad(rows, IGNORE_INDEX if k.endswith("labels") else 0)
    for kind in ("tft", "lc", "et", "en"):
        out[f"{kind}_mask"] = pad([[1] * len(x) for x in b[f"{kind}_tokens"]], 0)
    return out


def ce_sum(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def hf_logit_lens(ref, hidden):
    logits = ref.lm_head(ref.model.norm(hidden)).float()
    cap = getattr(ref.config, "final_logit_softcapping", None)
    return logits if cap is None else cap * torch.tanh(logits / cap)


def step_results(model, batch, mode, cfg):
    """(parts, gradients) of one dft_step and its backward."""
    model.zero_grad()
    out = model.dft_step(batch, mode, cfg, count_targets(batch, mode, cfg))
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def setup(request, tmp_path_factory):
    ref = hf_tiny(request.param)
    path = tmp_path_factory.mktemp("dft-" + request.param)
    ref.save_pretrained(path)
    g = torch.Generator().manual_seed(1)
    batch = make_batch([make_example(g, 97, 2) for _ in range(3)])
    return ref, Transformer.from_pretrained(path), batch


def test_logits_losses_equal_reference(setup):
    ref, ours, batch = setup
    cfg = DFTConfig(lc_layer=1, et_layer=2, chunk_size=5)
    with torch.no_grad():
        out = ours.dft_step(batch, "dft-logits", cfg, count_targets(batch, "dft-logits", cfg))
        tft_logits = ref(batch["tft_tokens"], attention_mask=batch["tft_mask"]).logits
        h_lc = ref(batch["lc_tokens"], attention_mask=batch["lc_mask"], output_hidden_states=True).hidden_states[1]
        h_et = ref(batch["et_tokens"], attention_mask=batch["et_mask"], output_hidden_states=True).hidden_states[2]
    lc_labels = batch["lc_labels"].masked_fill(batch["lc_content"] == 0, IGNORE_INDEX)
    n_tft, n_lc, n_et = [(x != IGNORE_INDEX).sum() for x in (batch["tft_labels"], lc_labels, batch["et_labels"])]
    assert n_lc < (batch["lc_labels"] != IGNORE_INDEX).sum()       # the template words really are left out
    torch.testing.assert_close(out["tft"], ce_sum(tft_logits, batch["tft_labels"]) / n_tft, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["lc"], ce_sum(hf_logit_lens(ref, h_lc), lc_labels) / n_lc, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["et"], ce_sum(hf_logit_lens(ref, h_et), batch["et_labels"]) / n_et, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["loss"], out["tft"] + out["lc"] + out["et"])

    all_en = DFTConfig(lc_layer=1, et_layer=2, lc_content_only=False)
    with torch.no_grad():
        out = ours.dft_step(batch, "dft-logits", all_en, count_targets(batch, "dft-logits", all_en))
    n_all = (batch["lc_labels"] != IGNORE_INDEX).sum()
    torch.testing.assert_close(out["lc"], ce_sum(hf_logit_lens(ref, h_lc), batch["lc_labels"]) / n_all, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_feature_losses_equal_separate_passes(setup, pooling):
    ref, ours, batch = setup
    cfg = DFTConfig(lc_layer=1, et_layer=2, pooling=pooling)
    with torch.no_grad():
        out = ours.dft_step(batch, "dft-feature", cfg, count_targets(batch, "dft-feature", cfg))
    lc, et = [], []
    for b in range(batch["tft_tokens"].shape[0]):
        p = int(batch["tgt_prompt_len"][b])
        n_en = int(batch["en_mask"][b].sum())
        with torch.no_grad():   # separate passes: the target prompt alone, the English prompt alone
            tgt = ref(batch["tft_tokens"][b:b + 1, :p], output_hidden_states=True).hidden_states
            en = ref(batch["en_tokens"][b:b + 1, :n_en], output_hidden_states=True).hidden_states
        t_idx = batch["tgt_content"][b, :p].nonzero()[:, 0]
        e_idx = batch["en_content"][b, :n_en].nonzero()[:, 0]
        if pooling == "last":
            t_idx, e_idx = t_idx[-1:], e_idx[-1:]
        pool = lambda h, idx: h[0, idx].mean(0)  # noqa: E731
        lc.append(1 - F.cosine_similarity(pool(tgt[1], t_idx), pool(en[1], e_idx), dim=0))
        et.append(1 - F.cosine_similarity(pool(tgt[2], t_idx), pool(en[-1], e_idx), dim=0))  # en[-1] is normed
    torch.testing.assert_close(out["lc"], torch.stack(lc).mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["et"], torch.stack(et).mean(), atol=1e-5, rtol=0)


def test_feature_lc_at_the_last_layer_keeps_its_teacher_unnormed(setup):
    """With --lc-layer N the LC teacher is the raw residual stream h_N(x_en), while the ET teacher is the
    final-norm output (teacher_norm): one English pass serves both, and the norm must reach only ET's."""
    ref, ours, batch = setup
    N = ours.args.n_layers
    cfg = DFTConfig(lc_layer=N, et_layer=2)
    with torch.no_grad():
        out = ours.dft_step(batch, "dft-feature", cfg, count_targets(batch, "dft-feature", cfg))
    raw = {}
    hook = ref.model.layers[-1].register_forward_hook(
        lambda module, args, output: raw.update(h=output[0] if isinstance(output, tuple) else output))
    lc = []
    try:
        for b in range(batch["tft_tokens"].shape[0]):
            p, n_en = int(batch["tgt_prompt_len"][b]), int(batch["en_mask"][b].sum())
            with torch.no_grad():
                ref(batch["tft_tokens"][b:b + 1, :p])
                student = raw["h"][0, batch["tgt_content"][b, :p].bool()].mean(0)
                ref(batch["en_tokens"][b:b + 1, :n_en])
                teacher = raw["h"][0, batch["en_content"][b, :n_en].bool()].mean(0)
            lc.append(1 - F.cosine_similarity(student, teacher, dim=0))
    finally:
        hook.remove()
    torch.testing.assert_close(out["lc"], torch.stack(lc).mean(), atol=1e-5, rtol=0)


def test_micro_batches_add_up_to_the_global_mean(setup):
    """Parts normalised by the global counts: two halves' losses and gradients sum to the whole batch's."""
    _, ours, batch = setup
    cfg = DFTConfig(lc_layer=1, et_layer=2)
    halves = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 1), slice(1, 3))]
    for mode in ("tft", "dft-logits", "dft-feature"):
        total = count_targets(batch, mode, cfg)
        assert total == {k: sum(count_targets(h, mode, cfg)[k] for h in halves) for k in total}
        ours.zero_grad()
        whole = ours.dft_step(batch, mode, cfg, total)
        whole["loss"].backward()
        g_whole = [p.grad.clone() for p in ours.parameters()]
        ours.zero_grad()
        split = sum(ours.dft_step(h, mode, cfg, total)["loss"] for h in halves)
        split.backward()
        torch.testing.assert_close(split, whole["loss"], atol=1e-5, rtol=0)
        for a, p in zip(g_whole, ours.parameters()):
            torch.testing.assert_close(p.grad, a, atol=1e-5, rtol=1e-4)
    ours.zero_grad()


def test_frozen_head_gets_only_the_tft_gradient(setup):
    """Head and final norm gradients under dft-logits equal those of plain TFT: LC/ET send them nothing."""
    ref, ours, batch = setup
    cfg = DFTConfig(lc_layer=1, et_layer=2)
    grads = {}
    for mode in ("tft", "dft-logits"):
        ours.zero_grad()
        ours.dft_step(batch, mode, cfg, count_targets(batch, mode, cfg))["loss"].backward()
        grads[mode] = {"norm": ours.norm.weight.grad.clone(), "block0": ours.layers[0].attention.wq.weight.grad.clone()}
        if ours.output is not None:
            grads[mode]["head"] = ours.output.weight.grad.clone()
    ours.zero_grad()
    torch.testing.assert_close(grads["dft-logits"]["norm"], grads["tft"]["norm"], atol=1e-6, rtol=1e-5)
    if "head" in grads["tft"]:
        torch.testing.assert_close(grads["dft-logits"]["head"], grads["tft"]["head"], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(grads["dft-logits"]["block0"], grads["tft"]["block0"])   # but the blocks do learn


def blocks_run(model, fn):
    ran = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k + 1)) for k, b in enumerate(model.layers)]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return ran


def test_passes_run_only_the_blocks_they_need_and_skipped_parts_do_not_run(tiny_llama):
    model = Transformer.from_pretrained(tiny_llama)            # 4 blocks
    g = torch.Generator().manual_seed(0)
    batch = make_batch([make_example(g, model.args.vocab_size, 2) for _ in range(2)])
    N = model.args.n_layers

    def run(mode, **kw):
        cfg = DFTConfig(lc_layer=1, et_layer=2, **kw)
        with torch.no_grad():
            return blocks_run(model, lambda: model.dft_step(batch, mode, cfg, count_targets(batch, mode, cfg)))

    full = list(range(1, N + 1))
    assert run("tft") == full
    assert run("dft-logits") == full + [1] + [1, 2]
    assert run("dft-logits", lc_weight=0.0) == full + [1, 2]
    assert run("dft-logits", et_type="none") == full + [1]
    assert run("dft-feature") == full + full                   # one English pass serves LC (h_1) and ET (h_N)
    assert run("dft-feature", et_weight=0.0) == full + [1]
    assert run("dft-logits", et_type="feature") == full + [1] + full
    cfg = DFTConfig(lc_layer=1, et_layer=2, et_weight=0.0)
    out = model.dft_step(batch, "dft-logits", cfg, count_targets(batch, "dft-logits", cfg))
    assert out["et"].grad_fn is None and float(out["et"]) == 0.0


def test_no_vocab_sized_tensor_is_kept_for_backward(tiny_llama):
    """What autograd keeps between forward and backward of a whole DFT step holds no [B, T, V] logits: tensors with
    a vocabulary dimension are at most one chunk of logits, or the head's own [V, D] gradient."""
    model = Transformer.from_pretrained(tiny_llama)
    g = torch.Generator().manual_seed(0)
    batch = make_batch([make_example(g, model.args.vocab_size, 2) for _ in range(4)])
    B, T, V = *batch["tft_tokens"].shape, model.args.vocab_size
    cfg = DFTConfig(lc_layer=1, et_layer=2, chunk_size=4)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(weakref.ref(t)) or t, lambda t: t):
        out = model.dft_step(batch, "dft-logits", cfg, count_targets(batch, "dft-logits", cfg))
    gc.collect()
    alive = [t for t in (r() for r in packed) if t is not None]
    vocab_sized = [t for t in alive if V in t.shape and tuple(t.shape) != tuple(model.head_weight.shape)]
    assert len(alive) > 10                                   # the blocks' activations are seen
    assert max((t.numel() for t in vocab_sized), default=0) <= cfg.chunk_size * V < B * T * V / 4
    out["loss"].backward()


@pytest.mark.parametrize("mode", ["tft", "dft-logits", "dft-feature"])
def test_training_lowers_every_part_and_moves_head_and_norm(tiny_llama, mode):
    model = Transformer.from_pretrained(tiny_llama)
    g = torch.Generator().manual_seed(0)
    batch = make_batch([make_example(g, model.args.vocab_size, 2) for _ in range(4)])
    cfg = DFTConfig(lc_layer=1, et_layer=2)
    counts = count_targets(batch, mode, cfg)
    head, norm = model.output.weight.detach().clone(), model.norm.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(8):
        out = model.dft_step(batch, mode, cfg, counts)
        first = first or {k: float(v.detach()) for k, v in out.items()}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    last = {k: float(v.detach()) for k, v in model.dft_step(batch, mode, cfg, counts).items()}
    for part in ("tft",) + (("lc", "et") if mode != "tft" else ()):
        assert last[part] < first[part], (part, first, last)
    assert not torch.equal(model.output.weight, head) and not torch.equal(model.norm.weight, norm)


def test_default_layers_and_bad_config():
    assert default_layers(32, "llama") == (2, 15)
    assert default_layers(26, "gemma2") == (2, 12)
    assert default_layers(4, "llama") == (1, 2)
    for n in range(2, 60):
        i, j = default_layers(n, "llama")
        assert 1 <= i < j <= n
    from model import ModelArgs

    with pytest.raises(ValueError, match="et_layer=40"):
        DFTConfig(et_layer=40).layers(ModelArgs(n_layers=32))
    with pytest.raises(ValueError, match="sft"):
        DFTConfig(lc_type="logits").types("sft")
    with pytest.raises(ValueError, match="mode="):
        DFTConfig().types("dft")
    assert DFTConfig(et_type="feature").types("dft-logits") == ("logits", "feature")
    assert DFTConfig(lc_type="logits").types("tft") == ("logits", "none")


@pytest.mark.parametrize("mode,overrides", [("dft-logits", {}), ("dft-logits", {"lc_content_only": False}),
                                            ("dft-logits", {"et_type": "feature"}), ("dft-logits", {"lc_weight": 0.0})])
def test_shared_prompt_path_equals_separate_passes(setup, mode, overrides):
    """Issue 16: LC/ET run on x_tgt's keys/values from the TFT pass give the same parts and every gradient as
    running [x_tgt ; x_en] and [x_tgt ; y_en] in full (padded rows of different prompt lengths; Gemma-2 with its
    sliding window shorter than the sequences)."""
    _, ours, batch = setup
    assert len(set(batch["tgt_prompt_len"].tolist())) > 1
    shared, separate = (step_results(ours, batch, mode, DFTConfig(lc_layer=1, et_layer=3, prefix_share=share,
                                                                  **overrides)) for share in (True, False))
    assert_same_results(shared, separate)


def test_shared_prompt_path_runs_only_the_english_tokens(tiny_llama):
    model = Transformer.from_pretrained(tiny_llama)
    g = torch.Generator().manual_seed(0)
    batch = make_batch([make_example(g, model.args.vocab_size, 2) for _ in range(3)])
    seen = []
    hook = model.layers[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    try:
        cfg = DFTConfig(lc_layer=1, et_layer=2)
        with torch.no_grad():
            model.dft_step(batch, "dft-logits", cfg, count_targets(batch, "dft-logits", cfg))
    finally:
        hook.remove()
    P = batch["tgt_prompt_len"]
    rest = lambda kind: int((batch[f"{kind}_mask"].sum(1) - P).max())  # noqa: E731
    assert seen == [batch["tft_tokens"].shape[1], rest("lc"), rest("et")]


@pytest.mark.parametrize("mode", ["sft", "tft"])
def test_english_only_batch_runs_the_plain_loss(setup, mode):
    """SFT data has only the tft keys: sft and tft modes need nothing else, and give the reference CE."""
    ref, ours, batch = setup
    sft_batch = {k: batch[k] for k in ("tft_tokens", "tft_labels", "tft_mask", "tgt_prompt_len")}
    cfg = DFTConfig()
    out = ours.dft_step(sft_batch, mode, cfg, count_targets(sft_batch, mode, cfg))
    with torch.no_grad():
        logits = ref(batch["tft_tokens"], attention_mask=batch["tft_mask"]).logits
    n = (batch["tft_labels"] != IGNORE_INDEX).sum()
    torch.testing.assert_close(out["loss"].detach(), ce_sum(logits, batch["tft_labels"]) / n, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,activation_checkpointing",
                         [("llama", False), ("llama", True), ("qwen2", False)])
def test_fsdp2_blocks_return_no_view_and_gradients_unchanged(request, family, activation_checkpointing):
    """Every block returns its keys and values (the shared prefix reads them, and the suffix passes' gradients
    reach wk/wv through them). FSDP2 hooks its pre-backward unshard on a block's outputs and warns about views (an
    in-place op on one would drop the hook): a DFT step under train.py's fully_shard (a world of one, gloo) must
    not warn, and its gradients equal those of the unwrapped model. Qwen2's projections have biases (a Linear with a
    bias returns a view of its 2-D result)."""
    model = Transformer.from_pretrained(request.getfixturevalue(f"tiny_{family}"))
    g = torch.Generator().manual_seed(0)
    batch = make_batch([make_example(g, model.args.vocab_size, 2) for _ in range(3)])
    cfg = DFTConfig(lc_layer=1, et_layer=2)
    counts = count_targets(batch, "dft-logits", cfg)
    model.dft_step(batch, "dft-logits", cfg, counts)["loss"].backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        train.apply_fsdp(model, bf16=False, activation_checkpointing=activation_checkpointing, compile=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*view tensor")
            model.dft_step(batch, "dft-logits", cfg, counts)["loss"].backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad.full_tensor(), expected[name], atol=1e-6, rtol=1e-5, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode,share", [("dft-logits", True), ("dft-logits", False), ("dft-feature", False)])
def test_flex_attention_leaves_the_dft_step_unchanged(setup, flex_on_cpu, monkeypatch, mode, share):
    """With flex_attention for every pass that needs a mask (the prefix-shared suffix passes with their per-row
    prompt lengths; Gemma-2's every pass, past its window) the parts and every gradient equal the reference's."""
    _, ours, batch = setup
    cfg = DFTConfig(lc_layer=1, et_layer=3, prefix_share=share)
    expected = step_results(ours, batch, mode, cfg)
    monkeypatch.setattr(ours, "use_flex", True)
    got = step_results(ours, batch, mode, cfg)
    assert bool(flex_on_cpu) == (share or ours.args.attn_softcap is not None)   # LLaMA's own passes: no mask
    assert_same_results(got, expected)


@pytest.mark.parametrize("mode", ["tft", "dft-logits", "dft-feature"])
def test_right_padded_causal_path_leaves_the_dft_step_unchanged(tiny_llama, monkeypatch, mode):
    """Training batches are right-padded: every pass that needs no other mask runs SDPA's causal path with no mask,
    and the parts and every gradient equal those of the explicitly masked path."""
    model = Transformer.from_pretrained(tiny_llama)
    g = torch.Generator().manual_seed(0)
    batch = make_batch([make_example(g, model.args.vocab_size, 2) for _ in range(3)])
    cfg = DFTConfig(lc_layer=1, et_layer=2, prefix_share=False)
    fast = step_results(model, batch, mode, cfg)
    assert set(masks_seen(model, lambda: model.dft_step(batch, mode, cfg, count_targets(batch, mode, cfg)))) \
        == {"causal"}
    monkeypatch.setattr(model_module, "is_right_padded", lambda *masks: False)
    assert_same_results(fast, step_results(model, batch, mode, cfg))


def left_padded(batch):
    """The same batch padded on the left: every per-position row of a sequence rolled by its padding."""
    kinds = {"tft": ("tft_tokens", "tft_labels", "tgt_content"), "lc": ("lc_tokens", "lc_labels", "lc_content"),
             "et": ("et_tokens", "et_labels"), "en": ("en_tokens", "en_content")}
    out = dict(batch)
    for kind, keys in kinds.items():
        mask = batch[f"{kind}_mask"]
        pads = (mask.shape[1] - mask.sum(1)).tolist()
        for key in keys + (f"{kind}_mask",):
            out[key] = torch.stack([row.roll(n) for row, n in zip(batch[key], pads)])
    return out


def test_prefix_sharing_refuses_left_padding(setup):
    """The shared path reads x_tgt at the start of each row: a left-padded batch is refused in one line; the
    separate passes take it and give the right-padded batch's parts."""
    _, ours, batch = setup
    left = left_padded(batch)
    assert (left["tft_mask"][:, 0] == 0).any()
    cfg = DFTConfig(lc_layer=1, et_layer=3)
    with pytest.raises(ValueError, match="pad the batch on the right") as info:
        ours.dft_step(left, "dft-logits", cfg, count_targets(left, "dft-logits", cfg))
    assert "\n" not in str(info.value)
    separate = DFTConfig(lc_layer=1, et_layer=3, prefix_share=False)
    with torch.no_grad():
        got = ours.dft_step(left, "dft-logits", separate, count_targets(left, "dft-logits", separate))
        expected = ours.dft_step(batch, "dft-logits", cfg, count_targets(batch, "dft-logits", cfg))
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=0, msg=k)
