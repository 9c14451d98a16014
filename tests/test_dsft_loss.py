"""Tests for dsft_loss.py against independent references: fully materialised logits + F.cross_entropy for the
logit lens, hand-pooled vectors + F.cosine_similarity for the feature loss, and autograd's own saved-tensor
hooks for the memory claim."""

import ast
import copy
import datetime
import gc
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # so that plain `pytest` works as well as `python -m pytest`

import dsft_loss  # noqa: E402
from dsft_loss import feature_cosine_loss, logit_lens_ce  # noqa: E402


class TinyRMSNorm(torch.nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(1.0 + 0.3 * torch.randn(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


def reference_ce(hidden, norm, head_weight, labels, softcap, reduction):
    """The obvious implementation: the whole [B, T, V] logits tensor at once."""
    logits = F.linear(norm(hidden), head_weight).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction=reduction)


def make_case(batch=3, time=11, dim=8, vocab=37, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    hidden = (2.0 * torch.randn(batch, time, dim)).to(dtype)
    head = (0.8 * torch.randn(vocab, dim)).to(dtype)
    labels = torch.randint(0, vocab, (batch, time))
    labels[torch.rand(batch, time) < 0.3] = -100
    labels[1] = -100  # an example with no supervised token at all
    norm = TinyRMSNorm(dim).to(dtype)
    return hidden, norm, head, labels


def leaves(hidden, norm, head):
    """Independent trainable copies, so the two paths under comparison accumulate separate grads."""
    return hidden.clone().requires_grad_(True), copy.deepcopy(norm), head.clone().requires_grad_(True)


# ---------------------------------------------------------------- logit_lens_ce: values and gradients


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1024])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("freeze_head", [True, False])
def test_logit_lens_ce_matches_materialised_reference(chunk_size, softcap, reduction, freeze_head):
    hidden, norm, head, labels = make_case()
    n_supervised = int((labels != -100).sum())
    assert n_supervised > 7 and n_supervised % 4 and n_supervised % 7  # the last chunk is a partial one

    h_ours, norm_ours, w_ours = leaves(hidden, norm, head)
    h_ref, norm_ref, w_ref = leaves(hidden, norm, head)
    ours = logit_lens_ce(h_ours, norm_ours, w_ours, labels, chunk_size=chunk_size, softcap=softcap,
                         reduction=reduction, freeze_head=freeze_head)
    ref = reference_ce(h_ref, norm_ref, w_ref, labels, softcap, reduction)
    assert ours.dtype == torch.float32 and ours.shape == ()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)

    upstream = 1.7  # a non-unit incoming gradient must scale every gradient
    (upstream * ours).backward()
    (upstream * ref).backward()
    torch.testing.assert_close(h_ours.grad, h_ref.grad, rtol=1e-5, atol=1e-5)
    assert h_ours.grad[1].abs().max() == 0  # the all -100 row gets no gradient
    if freeze_head:
        for frozen in (w_ours.grad, norm_ours.weight.grad):
            assert frozen is None or frozen.abs().max() == 0
    else:
        torch.testing.assert_close(w_ours.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norm_ours.weight.grad, norm_ref.weight.grad, rtol=1e-5, atol=1e-5)


def test_softcap_changes_the_loss():
    """Guards the softcap tests above against a cap too loose to matter."""
    hidden, norm, head, labels = make_case()
    capped = logit_lens_ce(hidden, norm, head, labels, softcap=2.0)
    assert abs(capped.item() - logit_lens_ce(hidden, norm, head, labels).item()) > 0.1


def test_frozen_head_still_trains_through_another_path():
    """Gemma-2 ties the head to the embedding: freezing the aux-loss path must leave the other path's gradient."""
    hidden, norm, head, labels = make_case()
    h, norm_ours, w = leaves(hidden, norm, head)
    (logit_lens_ce(h, norm_ours, w, labels) + (w ** 2).sum()).backward()
    torch.testing.assert_close(w.grad, 2 * head)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_supervised_tokens_gives_zero_not_nan(reduction, dtype):
    """Zero gradients, not None: under FSDP2 every rank must hand the same gradients to the
    reduce-scatter, also a rank whose micro-batch has no supervised token."""
    hidden, norm, head, labels = make_case(dtype=dtype)
    labels = torch.full_like(labels, -100)
    h, norm_ours, w = leaves(hidden, norm, head)
    loss = logit_lens_ce(h, norm_ours, w, labels, reduction=reduction, freeze_head=False)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert h.grad is not None and h.grad.abs().max() == 0
    for g, param in ((w.grad, w), (norm_ours.weight.grad, norm_ours.weight)):
        assert g is not None and g.abs().max() == 0 and g.dtype == param.dtype


def test_bf16_inputs_give_fp32_loss_and_bf16_grads():
    hidden, norm, head, labels = make_case(dtype=torch.bfloat16)
    h_ours, norm_ours, w_ours = leaves(hidden, norm, head)
    h_ref, norm_ref, w_ref = leaves(hidden, norm, head)
    ours = logit_lens_ce(h_ours, norm_ours, w_ours, labels, chunk_size=5, softcap=2.0, freeze_head=False)
    ref = reference_ce(h_ref, norm_ref, w_ref, labels, 2.0, "mean")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    ours.backward()
    ref.backward()
    assert h_ours.grad.dtype == torch.bfloat16 and w_ours.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h_ours.grad, h_ref.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(w_ours.grad, w_ref.grad, rtol=2e-2, atol=2e-3)


def test_bf16_head_gradient_error_does_not_grow_with_the_number_of_chunks():
    """Summed over chunks in bf16, the head gradient's error grew with the chunk count (1.2e-2 at 128
    chunks against 2.3e-3 for one chunk, here); summed in fp32 and rounded once, it stays near the
    one-chunk error."""
    torch.manual_seed(0)
    tokens, vocab, dim = 512, 64, 32
    hidden = torch.randn(1, tokens, dim).bfloat16()
    head = (0.3 * torch.randn(vocab, dim)).bfloat16()
    labels = torch.randint(0, vocab, (1, tokens))
    exact = head.double().requires_grad_(True)
    reference_ce(hidden.double(), torch.nn.Identity(), exact, labels, None, "sum").backward()
    errors = {}
    for chunk_size in (4, tokens):
        w = head.clone().requires_grad_(True)
        logit_lens_ce(hidden, torch.nn.Identity(), w, labels, chunk_size=chunk_size, reduction="sum",
                      freeze_head=False).backward()
        assert w.grad.dtype == torch.bfloat16
        errors[chunk_size] = ((w.grad.double() - exact.grad).norm() / exact.grad.norm()).item()
    assert errors[tokens] < 4e-3, errors  # one chunk: bf16 matmuls and one rounding
    assert errors[4] < 1.5 * errors[tokens], errors


# Whichever level the dispatcher shows: linear itself (as under inference_mode) or its mm.
MATMULS = {torch.ops.aten.linear, torch.ops.aten.matmul, torch.ops.aten.mm, torch.ops.aten.addmm,
           torch.ops.aten.bmm}


class OpLog(TorchDispatchMode):
    """Every aten op that runs, forward and backward, with its arguments and tensor outputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.calls.append((func.overloadpacket, args, outputs))
        return out

    def count(self, ops):
        return sum(op in ops for op, _, _ in self.calls)

    def fresh_buffers_shaped_like(self, weight):
        """Outputs of weight's shape (or its transpose) in storage of their own: not views of it."""
        shapes = {tuple(weight.shape), tuple(weight.shape)[::-1]}
        storage = weight.untyped_storage().data_ptr()
        return [tuple(t.shape) for _, _, outputs in self.calls for t in outputs
                if tuple(t.shape) in shapes and t.untyped_storage().data_ptr() != storage]


@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("freeze_head", [True, False])
def test_with_grad_mode_off_one_head_matmul_per_chunk_and_no_gradient_buffers(grad_off, freeze_head):
    hidden, norm, head, labels = make_case()
    h, norm_ours, w = leaves(hidden, norm, head)  # everything trainable: only grad mode says no
    chunk_size = 4
    n_supervised = int((labels != -100).sum())
    n_chunks = -(-n_supervised // chunk_size)
    with torch.no_grad():
        ref = reference_ce(hidden, norm, head, labels, 2.0, "mean")
    with grad_off(), OpLog() as log:
        ours = logit_lens_ce(h, norm_ours, w, labels, chunk_size=chunk_size, softcap=2.0,
                             freeze_head=freeze_head)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not ours.requires_grad
    assert log.count(MATMULS) == n_chunks
    assert log.fresh_buffers_shaped_like(w) == []


@pytest.mark.parametrize("freeze_head, matmuls_per_chunk", [(True, 2), (False, 3)])
def test_op_log_sees_the_fused_gradient_matmuls_and_head_buffer(freeze_head, matmuls_per_chunk):
    """The probe of the test above, with grad mode on: it counts the gradient matmuls and finds the
    head's gradient buffer when the head trains."""
    hidden, norm, head, labels = make_case()
    h, norm_ours, w = leaves(hidden, norm, head)
    n_chunks = -(-int((labels != -100).sum()) // 4)
    with OpLog() as log:
        logit_lens_ce(h, norm_ours, w, labels, chunk_size=4, freeze_head=freeze_head)
    assert log.count(MATMULS) == matmuls_per_chunk * n_chunks
    assert bool(log.fresh_buffers_shaped_like(w)) == (not freeze_head)


# ---------------------------------------------------------------- logit_lens_ce: memory


def saved_for_backward_bytes(make_loss):
    """Bytes autograd keeps for backward once the loss is built: tensors packed by saved-tensor hooks that are still
    alive after the forward (graphs built and freed inside the forward do not count), one count per storage.
    Then runs backward to use them."""
    packed = []

    def pack(tensor):
        packed.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = make_loss()
    gc.collect()
    alive = {}
    for ref in packed:
        tensor = ref()
        if tensor is not None:
            alive[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    loss.backward()
    return sum(alive.values())


def memory_case(time, batch=2, dim=16, vocab=1000):
    torch.manual_seed(0)
    hidden = torch.randn(batch, time, dim, requires_grad=True)
    head = torch.randn(vocab, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, time))  # every token supervised: the worst case
    return hidden, TinyRMSNorm(dim), head, labels


def test_saved_tensors_do_not_scale_with_tokens_times_vocab():
    chunk, batch, dim, vocab = 16, 2, 16, 1000
    ours, materialised = {}, {}
    for time in (32, 256):
        hidden, norm, head, labels = memory_case(time, batch, dim, vocab)
        ours[time] = saved_for_backward_bytes(
            lambda: logit_lens_ce(hidden, norm, head, labels, chunk_size=chunk, softcap=30.0, freeze_head=False))
        hidden, norm, head, labels = memory_case(time, batch, dim, vocab)
        materialised[time] = saved_for_backward_bytes(lambda: reference_ce(hidden, norm, head, labels, 30.0, "mean"))

    params = (vocab * dim + dim) * 4
    for time in (32, 256):
        tokens = batch * time
        # head + norm weight, the gathered hidden rows (fp32), and three int64 index/label vectors per token,
        # plus at most one chunk of fp32 logits (a chunked design may keep one; this implementation keeps none).
        bound = params + tokens * (dim * 4 + 3 * 8) + chunk * vocab * 4
        assert ours[time] <= bound, (time, ours[time], bound)
        assert materialised[time] >= tokens * vocab * 4  # the reference keeps [B*T, V] fp32 logits (or more)
    # Eight times the tokens: the materialised version grows by at least the new logits, ours by O(T*D) only.
    assert materialised[256] - materialised[32] >= batch * 224 * vocab * 4
    assert ours[256] - ours[32] <= batch * 224 * (dim * 4 + 3 * 8)
    assert ours[256] * 10 < materialised[256]


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces, in forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_no_op_ever_builds_more_than_one_chunk_of_logits():
    chunk, time, batch, vocab = 16, 128, 2, 1000
    hidden, norm, head, labels = memory_case(time, batch, vocab=vocab)
    with LargestTensor() as ours:
        logit_lens_ce(hidden, norm, head, labels, chunk_size=chunk, freeze_head=False).backward()
    assert ours.largest <= chunk * vocab, ours.largest

    hidden, norm, head, labels = memory_case(time, batch, vocab=vocab)
    with LargestTensor() as materialised:  # shows that the probe sees the [B*T, V] logits when they exist
        reference_ce(hidden, norm, head, labels, None, "mean").backward()
    assert materialised.largest >= batch * time * vocab


# ---------------------------------------------------------------- logit_lens_ce under FSDP2


class TinyLM(torch.nn.Module):
    """Embedding, two residual blocks, final norm, head: enough to put a DFT-style step under FSDP2."""

    def __init__(self, vocab=50, dim=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(2))
        self.norm = TinyRMSNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def tft_plus_lens(self, tokens, labels, n_global):
        h = self.embed(tokens)
        states = []
        for block in self.blocks:
            h = h + torch.tanh(block(h))
            states.append(h)
        tft = logit_lens_ce(states[-1], self.norm, self.head.weight, labels, chunk_size=3, reduction="sum",
                            freeze_head=False)
        lens = logit_lens_ce(states[0], self.norm, self.head.weight, labels, chunk_size=3, reduction="sum")
        return (tft + lens) / n_global


def fsdp_worker(rank, world, init_file, rank1_unsupervised):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    torch.set_num_threads(1)  # two workers on a small shared CPU
    # A timeout, so that ranks whose collectives disagree fail the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        model = TinyLM()
        single = copy.deepcopy(model)
        tokens = torch.randint(0, 50, (4, 7))
        labels = torch.randint(0, 50, (4, 7))
        labels[:, :2] = -100
        labels[3, 5] = -100  # unequal token counts across ranks
        if rank1_unsupervised:  # rank 1's micro-batch has no supervised token at all
            labels[2:] = -100
        n_global = (labels != -100).sum()
        single.tft_plus_lens(tokens, labels, n_global).backward()

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)  # norm and head live in the root unit
        register_fsdp_forward_method(model, "tft_plus_lens")
        mine = slice(rank * 2, rank * 2 + 2)
        # FSDP2 averages gradients over ranks; the per-rank sums want a plain sum, hence * world.
        (model.tft_plus_lens(tokens[mine], labels[mine], n_global) * world).backward()
        for (name, sharded), (_, reference) in zip(model.named_parameters(), single.named_parameters()):
            torch.testing.assert_close(sharded.grad.full_tensor(), reference.grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rank1_unsupervised", [False, True])
def test_gradients_under_fsdp2_equal_single_process(tmp_path, rank1_unsupervised):
    """Parameters are read at call time: under FSDP2 they are the unsharded tensors of the running forward.
    A rank with no supervised token still gives the head and norm (zero) gradients, so the ranks'
    reduce-scatters match."""
    torch.multiprocessing.spawn(fsdp_worker, args=(2, str(tmp_path / "init"), rank1_unsupervised),
                                nprocs=2)


# ---------------------------------------------------------------- logit_lens_ce: bad input


@pytest.mark.parametrize("change, message", [
    (dict(reduction="none"), "reduction='none'"),
    (dict(chunk_size=0), "chunk_size=0"),
    (dict(softcap=0.0), "softcap=0.0"),
    (dict(labels=torch.zeros(3, 10, dtype=torch.long)), "labels have shape (3, 10)"),
    (dict(labels=torch.zeros(3, 11)), "labels have dtype torch.float32"),
    (dict(labels=torch.full((3, 11), 37)), "labels contain 37"),
    (dict(labels=torch.full((3, 11), -1)), "labels contain -1"),
    (dict(head_weight=torch.zeros(37, 9)), "head_weight has shape (37, 9)"),
    (dict(hidden=torch.zeros(3, 11)), "hidden has shape (3, 11)"),
    (dict(norm=lambda x: x), "norm is a function"),
])
def test_logit_lens_ce_rejects_bad_input_in_one_line(change, message):
    hidden, norm, head, labels = make_case()
    args = dict(hidden=hidden, norm=norm, head_weight=head, labels=labels) | change
    with pytest.raises(ValueError) as error:
        logit_lens_ce(**args)
    assert message in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------- feature_cosine_loss


def hand_pool(hidden, mask, pooling):
    vectors = []
    for b in range(hidden.shape[0]):
        marked = [t for t in range(hidden.shape[1]) if mask[b, t]]
        vectors.append(hidden[b, marked].mean(0) if pooling == "mean" else hidden[b, marked[-1]])
    return vectors


def feature_case(dtype=torch.float32):
    torch.manual_seed(1)
    student = torch.randn(3, 9, 6).to(dtype)
    teacher = (torch.randn(3, 13, 6) + 0.5 * torch.randn(1, 1, 6)).to(dtype)
    # Content spans with padding or template tokens on both sides, and a single-token span.
    mask_student = torch.zeros(3, 9, dtype=torch.long)
    mask_student[0, 2:7] = 1
    mask_student[1, 0:9] = 1
    mask_student[2, 4] = 1
    mask_teacher = torch.zeros(3, 13, dtype=torch.long)
    mask_teacher[0, 1:12] = 1
    mask_teacher[1, 5:8] = 1
    mask_teacher[2, 0:2] = 1
    return student, teacher, mask_student, mask_teacher


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("detach_teacher", [True, False])
def test_feature_cosine_loss_matches_hand_computation(pooling, reduction, detach_teacher):
    student, teacher, mask_student, mask_teacher = feature_case()
    s_ours, t_ours = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    s_ref, t_ref = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)

    ours = feature_cosine_loss(s_ours, t_ours, mask_student, mask_teacher, pooling=pooling,
                               detach_teacher=detach_teacher, reduction=reduction)
    per_example = torch.stack([
        1 - F.cosine_similarity(s, t, dim=0)
        for s, t in zip(hand_pool(s_ref, mask_student, pooling), hand_pool(t_ref, mask_teacher, pooling))])
    ref = {"mean": per_example.mean(), "sum": per_example.sum(), "none": per_example}[reduction]
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref)

    weights = torch.tensor([0.5, -1.0, 2.0])  # a non-uniform upstream gradient for the "none" case
    (ours * weights[: ours.numel()].reshape(ours.shape)).sum().backward()
    (ref * weights[: ref.numel()].reshape(ref.shape)).sum().backward()
    torch.testing.assert_close(s_ours.grad, s_ref.grad)
    if detach_teacher:
        assert t_ours.grad is None
    else:
        torch.testing.assert_close(t_ours.grad, t_ref.grad)


def test_feature_pooling_picks_the_intended_tokens():
    """'last' must ignore trailing unmarked states, 'mean' every unmarked state."""
    student, teacher, mask_student, mask_teacher = feature_case()
    far_away = teacher.clone()
    far_away[mask_teacher == 0] = 1e4
    for pooling in ("mean", "last"):
        torch.testing.assert_close(
            feature_cosine_loss(student, far_away, mask_student, mask_teacher, pooling=pooling, reduction="none"),
            feature_cosine_loss(student, teacher, mask_student, mask_teacher, pooling=pooling, reduction="none"))


def test_feature_cosine_loss_computes_in_fp32_for_bf16_states():
    student, teacher, mask_student, mask_teacher = feature_case(torch.bfloat16)
    ours = feature_cosine_loss(student, teacher, mask_student.bool(), mask_teacher.float(), reduction="none")
    ref = torch.stack([1 - F.cosine_similarity(s, t, dim=0) for s, t in zip(
        hand_pool(student.float(), mask_student, "mean"), hand_pool(teacher.float(), mask_teacher, "mean"))])
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref)


def test_feature_cosine_loss_names_the_empty_row_and_mask():
    student, teacher, mask_student, mask_teacher = feature_case()
    mask_teacher[2] = 0
    with pytest.raises(ValueError, match=r"mask_teacher row 2 marks no token"):
        feature_cosine_loss(student, teacher, mask_student, mask_teacher)
    mask_student[0] = 0
    with pytest.raises(ValueError, match=r"mask_student row 0 marks no token"):
        feature_cosine_loss(student, teacher, mask_student, mask_teacher)


@pytest.mark.parametrize("change, message", [
    (dict(pooling="max"), "pooling='max'"),
    (dict(reduction="batchmean"), "reduction='batchmean'"),
    (dict(h_teacher=torch.randn(2, 13, 6)), "differ in B or D"),
    (dict(h_teacher=torch.randn(3, 13, 7)), "differ in B or D"),
    (dict(h_student=torch.randn(3, 9)), "h_student has shape (3, 9)"),
    (dict(mask_student=torch.ones(3, 13)), "mask_student has shape (3, 13)"),
    (dict(mask_teacher=torch.ones(3, 9)), "mask_teacher has shape (3, 9)"),
    (dict(mask_teacher=torch.full((3, 13), 0.5)), "mask_teacher has values other than 0 and 1"),
])
def test_feature_cosine_loss_rejects_bad_input_in_one_line(change, message):
    student, teacher, mask_student, mask_teacher = feature_case()
    args = dict(h_student=student, h_teacher=teacher, mask_student=mask_student, mask_teacher=mask_teacher) | change
    with pytest.raises(ValueError) as error:
        feature_cosine_loss(**args)
    assert message in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------- host-device syncs


SYNCING = {torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.masked_select}


def syncing_ops(log):
    """The logged ops that make the host wait for an accelerator: reading a value (item, bool,
    tolist), a data-dependent output size (nonzero, masked_select, indexing with a bool mask)."""
    found = []
    for op, args, _ in log.calls:
        indices = args[1] if op is torch.ops.aten.index and len(args) > 1 else []
        bool_index = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        if op in SYNCING or bool_index:
            found.append(op)
    return found


def test_logit_lens_ce_reads_no_value_on_the_host_off_cpu(monkeypatch):
    """Off CPU the value checks are skipped (they would sync every call); what is left is the one
    gather of the supervised rows. On CPU the checks run: the probe sees them."""
    hidden, norm, head, labels = make_case()
    with OpLog() as on_cpu:
        logit_lens_ce(hidden, norm, head, labels)
    assert len(syncing_ops(on_cpu)) > 1

    monkeypatch.setattr(dsft_loss, "_on_cpu", lambda tensor: False)  # as on an accelerator
    h, norm_ours, w = leaves(hidden, norm, head)
    with OpLog() as off_cpu:
        ours = logit_lens_ce(h, norm_ours, w, labels, freeze_head=False)
        ours.backward()
    assert syncing_ops(off_cpu) == [torch.ops.aten.nonzero]
    torch.testing.assert_close(ours, reference_ce(hidden, norm, head, labels, None, "mean"))


def test_feature_cosine_loss_reads_no_value_on_the_host_off_cpu():
    """The meta device holds no data: any value check would fail there."""
    student, teacher, mask_student, mask_teacher = feature_case()
    meta = [t.to("meta") for t in (student, teacher, mask_student, mask_teacher)]
    for pooling in ("mean", "last"):
        loss = feature_cosine_loss(*meta, pooling=pooling, reduction="none")
        assert loss.device.type == "meta" and loss.shape == (3,)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_feature_cosine_loss_off_cpu_gives_nan_for_an_empty_row_not_a_number(monkeypatch, pooling):
    student, teacher, mask_student, mask_teacher = feature_case()
    expected = feature_cosine_loss(student, teacher, mask_student, mask_teacher, pooling=pooling,
                                   reduction="none")
    mask_teacher[2] = 0
    monkeypatch.setattr(dsft_loss, "_on_cpu", lambda tensor: False)  # as on an accelerator
    loss = feature_cosine_loss(student, teacher, mask_student, mask_teacher, pooling=pooling,
                               reduction="none")
    assert torch.isnan(loss[2])
    torch.testing.assert_close(loss[:2], expected[:2])


# ---------------------------------------------------------------- the file itself


def test_dsft_loss_imports_torch_only():
    """People copy dsft_loss.py alone into their projects."""
    tree = ast.parse((REPO / "dsft_loss.py").read_text())
    modules = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            modules.append(node.module)
    assert modules, "no imports found: the parse went wrong"
    assert all(m == "torch" or m.startswith("torch.") for m in modules), modules
