"""Deep-supervision losses of DFT (Huo et al., "Enhancing Non-English Capabilities of English-
Centric Large Language Models through Deep Supervision Fine-Tuning", AAAI 2025, arXiv 2503.01275).
Imports torch only: copy this one file into your project.

h_k(x): the residual stream after block k of N, before the final norm; W_out: the output head,
read after the final norm ("logit lens"). An example pairs a target-language prompt and response
(x_tgt, y_tgt) with their English original (x_en, y_en); layer i is early (language conversion),
j in the middle ("thinking in English"). S = the paper states it, I = our choice where it is silent.

    L     = L_TFT + L_LC + L_ET                       (S: unweighted; I: callers may weight LC, ET)
    L_TFT = -log P(y_tgt | x_tgt; theta, W_out)       ordinary fine-tuning loss, last layer (S)
  logits-based (DFT-logits), W_out frozen (S: in L_LC; I: in L_ET too, with the final norm):
    L_LC  = -log P(x_en | x_tgt; theta_{1:i}, W_out)  from layer i, predict the English query (S)
    L_ET  = -log P(y_en | x_tgt; theta_{1:j}, W_out)  from layer j, predict the English answer (S)
  feature-based (DFT-feature), the English side a detached teacher (I):
    L_LC  = 1 - cos(h_i(x_en), h_i(x_tgt))            (S)
    L_ET  = 1 - cos(h_N(x_en), h_j(x_tgt))            (S)

  I: a logits loss is the CE of the English tokens in one teacher-forced sequence, [x_tgt ; x_en]
  or [x_tgt ; y_en]; feature losses compare vectors pooled over the query; loss math is fp32.

Usage with a Hugging Face-style causal LM (LLaMA-2, Gemma-2), one parallel batch: `lc_*` holds
[x_tgt ; x_en] with (shifted) labels on x_en, `et_*` [x_tgt ; y_en] with labels on y_en.

    from dsft_loss import logit_lens_ce, feature_cosine_loss
    body, W, i, j = model.model, model.lm_head.weight, 2, 15        # inside *ForCausalLM
    cap = getattr(model.config, "final_logit_softcapping", None)     # Gemma-2: 30.0
    def states(tokens, mask):  # [k]: block k's output, but HF's [N] is already normed
        return body(tokens, attention_mask=mask, output_hidden_states=True).hidden_states
    tgt = states(tft_tokens, tft_mask)
    tft = logit_lens_ce(tgt[-1], torch.nn.Identity(), W, tft_labels, softcap=cap, freeze_head=False)
    # DFT-logits: frozen head, gradient into blocks 1..i (resp. 1..j)
    lc = logit_lens_ce(states(lc_tokens, lc_mask)[i], body.norm, W, lc_labels, softcap=cap)
    et = logit_lens_ce(states(et_tokens, et_mask)[j], body.norm, W, et_labels, softcap=cap)
    # DFT-feature instead: students come free from the TFT pass; masks mark the query's content.
    en = states(en_tokens, en_mask)
    lc = feature_cosine_loss(tgt[i], en[i], tgt_content, en_content)
    et = feature_cosine_loss(tgt[j], en[-1], tgt_content, en_content)
    (tft + lc + et).backward()
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _check(ok, message):
    if not ok:
        raise ValueError(message)


def _on_cpu(tensor):  # value checks read data on the host: free on CPU, a sync per call elsewhere
    return tensor.device.type == "cpu"


def _ce_and_grad(logits, targets, softcap, want_grad):
    """Summed CE of softcap(logits) [n, V] and, if want_grad, its gradient wrt the logits, in place:
    z = c·tanh(l/c), p = softmax(z); dCE/dz = p − onehot(target), dz/dl = 1 − tanh²(l/c)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32: logits, CE
    tanh = None if softcap is None else logits.div_(softcap).tanh_()
    capped = logits if softcap is None else tanh * softcap
    picked = capped.gather(1, targets[:, None])  # [n, 1]
    top = capped.amax(dim=1, keepdim=True)
    exp = capped.sub_(top).exp_()
    total = exp.sum(dim=1, keepdim=True)
    loss = (top + total.log() - picked).sum()
    if not want_grad:
        return loss, None
    grad = exp.div_(total)
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1  # index_put: deterministic
    return loss, grad if softcap is None else grad.addcmul_(grad, tanh.square_(), value=-1)


def _chunked_ce(rows, targets, chunk_size, softcap, norm, params, needs):
    """Summed CE of the rows [n, D] and, where `needs` (rows, *params) says so, its gradients."""
    grad_rows = torch.zeros_like(rows) if needs[0] else None
    sums = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
            if need else None for p, need in zip(params, needs[1:])]
    total = rows.new_zeros((), dtype=torch.promote_types(rows.dtype, torch.float32))
    for start in range(0, rows.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        # A detached leaf: autograd.grad walks this chunk's norm and head matmul, nothing else.
        chunk_rows = rows[chunk].detach().requires_grad_(needs[0])
        with torch.set_grad_enabled(any(needs)):
            normed = norm(chunk_rows)
            _check(normed.shape == chunk_rows.shape, f"logit_lens_ce: norm maps "
                   f"{tuple(chunk_rows.shape)} to {tuple(normed.shape)}; expected the same shape")
            # In the head's dtype: an fp32 copy of a bf16 [V, D] head would cost GBs.
            logits = F.linear(normed.to(params[0].dtype), params[0])  # [n, V]
        loss, grad_logits = _ce_and_grad(logits.detach(), targets[chunk], softcap, any(needs))
        total += loss
        if grad_logits is not None:
            wrt = [t for t, need in zip((chunk_rows, *params), needs) if need]
            grads = iter(torch.autograd.grad(logits, wrt, grad_logits.to(logits.dtype)))
            if needs[0]:
                grad_rows[chunk] = next(grads)
            for grad_sum, grad in zip([t for t in sums if t is not None], grads):
                grad_sum.add_(grad)
        del logits, grad_logits  # before the next chunk's logits exist
    return total, grad_rows, [None if s is None else s.to(p.dtype) for s, p in zip(sums, params)]


class _FusedChunkedCE(torch.autograd.Function):
    """Summed CE of the rows, with its gradients formed chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, rows, targets, chunk_size, softcap, norm, needs, *params):
        # params: the head, then the norm's parameters (detached if frozen; the norm uses its own).
        loss, grad_rows, sums = _chunked_ce(rows, targets, chunk_size, softcap, norm, params, needs)
        ctx.save_for_backward(grad_rows, *sums)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        # A 0-dim fp32 factor keeps each gradient's dtype and rounds once, the product.
        grad_rows, *grad_params = (None if g is None else g * grad_total for g in ctx.saved_tensors)
        return grad_rows, None, None, None, None, None, *grad_params


def logit_lens_ce(hidden, norm, head_weight, labels, chunk_size=1024, softcap=None,
                  reduction="mean", freeze_head=True):
    """Cross-entropy of the output head read off a hidden state (logit lens).

        logits[b, t] = softcap(W_out · norm(hidden[b, t]))     softcap(z) = c·tanh(z/c), or z
        loss = Σ_{(b,t): labels[b,t] != -100} −log softmax(logits[b, t])[labels[b, t]]

    hidden [B, T, D]; norm: the final norm (an nn.Module); head_weight [V, D]; labels [B, T] int,
    shifted (labels[b, t]: the token after t; -100: none); softcap: Gemma-2's c or None. Returns
    fp32: the sum ("sum"; over ranks and micro-batches, divide by their global token count) or the
    mean over supervised tokens ("mean"; 0.0 over none). freeze_head=True (L_LC, L_ET): head and
    norm get no gradient, the hidden state does; False (L_TFT): all do.

    Memory (I): rows run `chunk_size` at a time, each chunk's gradients formed while its logits
    exist (the loss is a sum over rows), softmax and softcap by hand and in place: two [chunk, V]
    fp32 buffers with a softcap, one without; no recompute, nothing with a V dimension kept for
    backward but the head's gradient, summed over chunks in fp32 (a bf16 head's error does not grow
    with the chunk count; zeros, not None, with no supervised token: FSDP2 needs them on all ranks).
    """
    fn = "logit_lens_ce"
    _check(reduction in ("mean", "sum"), f"{fn}: reduction={reduction!r}; expected 'mean' or 'sum'")
    _check(isinstance(norm, torch.nn.Module),
           f"{fn}: norm is a {type(norm).__name__}; expected the model's final norm (an nn.Module)")
    _check(type(chunk_size) is int and chunk_size > 0 and (softcap is None or softcap > 0),
           f"{fn}: chunk_size={chunk_size!r}, softcap={softcap!r}; expected int > 0, None or > 0")
    _check(hidden.dim() == 3 and hidden.is_floating_point(), f"{fn}: hidden has shape "
           f"{tuple(hidden.shape)} and dtype {hidden.dtype}; expected a float [B, T, D] tensor")
    _check(head_weight.dim() == 2 and head_weight.shape[1] == hidden.shape[2], f"{fn}: head_weight "
           f"has shape {tuple(head_weight.shape)}; expected [V, {hidden.shape[2]}], hidden's D")
    _check(labels.shape == hidden.shape[:2] and labels.device == hidden.device,
           f"{fn}: labels have shape {tuple(labels.shape)} on {labels.device}; expected hidden's "
           f"[B, T] {tuple(hidden.shape[:2])} on {hidden.device}")
    _check(not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool),
           f"{fn}: labels have dtype {labels.dtype}; expected an integer tensor (torch.long)")
    for name, value in [("head_weight", head_weight), *norm.named_parameters(prefix="norm")]:
        _check(type(value).__name__ != "DTensor", f"{fn}: {name} is a sharded DTensor; under "
               "FSDP2 call this inside forward or a method given to register_fsdp_forward_method")
    flat_labels = labels.reshape(-1).long()
    keep = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)  # [n]
    targets = flat_labels.index_select(0, keep)
    vocab = head_weight.shape[0]
    bad = targets[(targets < 0) | (targets >= vocab)].tolist() if _on_cpu(targets) else []
    if bad:
        raise ValueError(f"{fn}: labels contain {bad[0]}; expected ids in [0, {vocab}) or -100")
    rows = hidden.reshape(-1, hidden.shape[2]).index_select(0, keep)  # [n, D]
    # freeze_head: stop-gradient on the head path only; the hidden state still gets its gradient.
    params = tuple(p.detach() if freeze_head else p for p in (head_weight, *norm.parameters()))
    needs = [torch.is_grad_enabled() and t.requires_grad for t in (rows, *params)]
    total = _FusedChunkedCE.apply(rows, targets, chunk_size, softcap, norm, needs, *params)
    return total / max(keep.numel(), 1) if reduction == "mean" else total


def _pool(hidden, mask, pooling, mask_name):
    """[B, T, D] hidden states -> [B, D] fp32 vectors over the positions where mask is nonzero."""
    if _on_cpu(mask):
        _check(mask.dtype == torch.bool or not ((mask != 0) & (mask != 1)).any(),
               f"feature_cosine_loss: {mask_name} has values other than 0 and 1; expected 0/1")
        empty = (mask == 0).all(dim=1)  # [B]
        _check(not empty.any(), f"feature_cosine_loss: {mask_name} row {int(empty.int().argmax())} "
               "marks no token; expected at least one token to pool per example")
    mask = mask != 0  # [B, T]
    # fp32: pooling and cosine. An empty row gives NaN (0/0, or the where below), never a number.
    if pooling == "mean":
        return torch.einsum("btd,bt->bd", hidden.float(), mask.float()) / mask.sum(1, keepdim=True)
    last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(dim=1)  # [B]
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    return torch.where(mask.any(dim=1, keepdim=True), picked, torch.nan)


def feature_cosine_loss(h_student, h_teacher, mask_student, mask_teacher, pooling="mean",
                        detach_teacher=True, reduction="mean"):
    """Cosine distance between pooled hidden states of a student and a teacher sequence.

        loss[b] = 1 − cos(pool(h_student[b], mask_student[b]),
                          pool(h_teacher[b], mask_teacher[b]))

    Student: the target-language side, teacher: the English one. h_student [B, T_s, D], h_teacher
    [B, T_t, D], masks [B, T_s], [B, T_t]: 1 on the tokens to pool. Returns fp32: the batch mean
    ("mean"), the sum ("sum") or [B] ("none"). Pooling (I): "mean" the masked mean, "last" the last
    marked position. Masks are checked on CPU only (an all-zero row: an error there, NaN elsewhere).
    """
    fn = "feature_cosine_loss"
    _check(pooling in ("mean", "last") and reduction in ("mean", "sum", "none"), f"{fn}: pooling="
           f"{pooling!r}, reduction={reduction!r}; expected 'mean'/'last', 'mean'/'sum'/'none'")
    for name, h in (("h_student", h_student), ("h_teacher", h_teacher)):
        _check(h.dim() == 3 and h.is_floating_point(), f"{fn}: {name} has shape "
               f"{tuple(h.shape)} and dtype {h.dtype}; expected a float [B, T, D] tensor")
    _check(h_student.shape[::2] == h_teacher.shape[::2], f"{fn}: h_student "  # [B, D]
           f"{tuple(h_student.shape)} and h_teacher {tuple(h_teacher.shape)} differ in B or D")
    for name, mask, h in (("mask_student", mask_student, h_student),
                          ("mask_teacher", mask_teacher, h_teacher)):
        _check(mask.shape == h.shape[:2] and mask.device == h.device, f"{fn}: {name} has shape "
               f"{tuple(mask.shape)} on {mask.device}; expected {tuple(h.shape[:2])} on {h.device}")
    h_teacher = h_teacher.detach() if detach_teacher else h_teacher  # (I) English: the teacher
    student = _pool(h_student, mask_student, pooling, "mask_student")  # [B, D]
    teacher = _pool(h_teacher, mask_teacher, pooling, "mask_teacher")  # [B, D]
    loss = 1.0 - F.cosine_similarity(student, teacher, dim=-1)  # [B]
    return {"mean": loss.mean(), "sum": loss.sum(), "none": loss}[reduction]
