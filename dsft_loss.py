"""Deep-supervision losses of DFT (Huo et al., "Enhancing Non-English Capabilities of English-Centric Large
Language Models through Deep Supervision Fine-Tuning", AAAI 2025, arXiv 2503.01275). Imports torch only: copy
this one file into your project.

Notation. A model with N blocks; h_k(x) = the residual stream after block k (k = 1..N, before the final norm);
W_out = the output head, applied after the model's final norm ("logit lens"). An example is a parallel pair:
the target-language prompt/response (x_tgt, y_tgt) and its English original (x_en, y_en). Layer i is early
(language conversion), layer j is in the middle ("thinking in English").

Total loss (S = the paper states it, I = our choice where the paper is silent):

    L = L_TFT + L_LC + L_ET                                      (S: unweighted; I: callers may weight LC and ET)

    L_TFT = -log P(y_tgt | x_tgt; theta, W_out)                  ordinary fine-tuning loss at the last layer (S)

  logits-based (DFT-logits), W_out frozen:
    L_LC  = -log P(x_en | x_tgt; theta_{1:i}, W_out)             from layer i, predict the English query (S)
    L_ET  = -log P(y_en | x_tgt; theta_{1:j}, W_out)             from layer j, predict the English answer (S)

  feature-based (DFT-feature):
    L_LC  = 1 - cos(h_i(x_en), h_i(x_tgt))                       (S)
    L_ET  = 1 - cos(h_N(x_en), h_j(x_tgt))                       (S)

What is the paper's and what is ours:
  - S: W_out only takes part in the forward pass of L_LC. I: the same for L_ET, and the final norm is part of the
    head (as in the logit-lens literature) and is frozen too; the hidden state always gets its gradient.
  - I: one teacher-forced sequence per logits loss, [x_tgt ; x_en] for LC and [x_tgt ; y_en] for ET, with
    cross-entropy on the English tokens only (the caller builds the sequences and labels).
  - I: the feature losses compare pooled vectors (the two sequences have different lengths): the mean over
    content tokens by default, or the last marked token; the English side is a teacher and is detached.
  - I: all loss math runs in fp32; cross-entropy is chunked over tokens and each chunk's gradient is formed
    while its logits exist, so no [B, T, V] logits tensor is ever built and what autograd keeps for backward
    has no dimension of size V beyond the head's own gradient.

Usage with someone else's Hugging Face-style causal LM (LLaMA-2 or Gemma-2), one parallel batch.
`lc_*` holds [x_tgt ; x_en] with labels on x_en, `et_*` holds [x_tgt ; y_en] with labels on y_en; labels are
already shifted (labels[b, t] is the token at t + 1, -100 where unsupervised).

    from dsft_loss import logit_lens_ce, feature_cosine_loss

    body = model.model                       # LlamaModel / Gemma2Model inside *ForCausalLM
    norm, head_w = body.norm, model.lm_head.weight
    softcap = getattr(model.config, "final_logit_softcapping", None)     # Gemma-2: 30.0
    i, j = 2, 15

    # HF's hidden_states[k] is the output of block k for k < N, but hidden_states[N] is already normed,
    # so the TFT call passes an identity norm. (This runs all N blocks for LC/ET; running only 1..i or
    # 1..j is cheaper and gives the same numbers.)
    tgt = body(tft_tokens, attention_mask=tft_mask, output_hidden_states=True).hidden_states
    tft = logit_lens_ce(tgt[-1], torch.nn.Identity(), head_w, tft_labels, softcap=softcap, freeze_head=False)

    # DFT-logits: frozen head, gradient into blocks 1..i (resp. 1..j)
    h_i = body(lc_tokens, attention_mask=lc_mask, output_hidden_states=True).hidden_states[i]
    h_j = body(et_tokens, attention_mask=et_mask, output_hidden_states=True).hidden_states[j]
    lc = logit_lens_ce(h_i, norm, head_w, lc_labels, softcap=softcap)
    et = logit_lens_ce(h_j, norm, head_w, et_labels, softcap=softcap)

    # DFT-feature instead: the target-side states come free from the TFT pass (causality); the masks mark
    # the query's instruction+input tokens.
    en = body(en_tokens, attention_mask=en_mask, output_hidden_states=True).hidden_states
    lc = feature_cosine_loss(tgt[i], en[i], tgt_content, en_content)
    et = feature_cosine_loss(tgt[j], en[-1], tgt_content, en_content)

    (tft + lc + et).backward()
"""

import torch
import torch.nn.functional as F
from torch.func import functional_call

IGNORE_INDEX = -100


def _head_logits(norm, norm_params, head_weight, rows, softcap):
    """logits [n, V] of n hidden rows [n, D]: norm -> head -> softcap, upcast to (at least) fp32."""
    normed = functional_call(norm, norm_params, (rows,))
    if normed.shape != rows.shape:
        raise ValueError(f"logit_lens_ce: norm maps {tuple(rows.shape)} to {tuple(normed.shape)}; "
                         "expected a norm that keeps the shape")
    # The matmul runs in the head's dtype (a [V, D] fp32 copy of a bf16 head would cost GBs for Gemma's
    # 256k vocabulary); the logits themselves are fp32 from here on.
    logits = F.linear(normed.to(head_weight.dtype), head_weight)  # [n, V]
    # fp32: logits, softcap and log-softmax
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


class _ChunkedLogitLensCE(torch.autograd.Function):
    """Summed CE over supervised rows, chunk by chunk, with the gradients computed in the same sweep.

    The loss is a sum of per-row terms, so d(loss)/d(input) can be formed chunk by chunk while each chunk's
    logits exist, and backward only scales it by the incoming gradient. Nothing with a vocabulary dimension
    outlives its chunk, and no chunk is computed twice: the head costs 3 matmuls per chunk when it trains
    (logits, d rows, d head) and 2 when frozen, against 4 and 3 for forward + recompute-in-backward.
    Saved for backward: d rows [n, D], d head [V, D] (the head's gradient, which backward needs anyway) and
    d norm params -- only those that need a gradient.
    """

    @staticmethod
    def forward(ctx, rows, targets, chunk_size, softcap, norm, param_names, head_weight, *param_values):
        need_rows, need_head = ctx.needs_input_grad[0], ctx.needs_input_grad[6]
        need_params = ctx.needs_input_grad[7:]
        any_grad = need_rows or need_head or any(need_params)
        grad_rows = torch.zeros_like(rows) if need_rows else None
        grad_head, grad_params = None, [None] * len(param_values)
        # Detached leaves: each autograd.grad call walks one chunk's small graph and nothing else.
        head = head_weight.detach().requires_grad_(need_head)
        params = [p.detach().requires_grad_(need) for p, need in zip(param_values, need_params)]
        norm_params = dict(zip(param_names, params))
        total = rows.new_zeros((), dtype=torch.promote_types(rows.dtype, torch.float32))
        for start in range(0, rows.shape[0], chunk_size):
            chunk_rows = rows[start:start + chunk_size].detach().requires_grad_(need_rows)
            with torch.set_grad_enabled(any_grad):
                logits = _head_logits(norm, norm_params, head, chunk_rows, softcap)
                loss = F.cross_entropy(logits, targets[start:start + chunk_size], reduction="sum")
            total += loss.detach()
            if not any_grad:
                continue
            wrt = [t for t in (chunk_rows, head, *params) if t.requires_grad]
            grads = list(torch.autograd.grad(loss, wrt))
            del logits, loss
            if need_rows:
                grad_rows[start:start + chunk_size] = grads.pop(0)
            # Accumulated in the parameters' own dtype: an fp32 accumulator for a bf16 [V, D] head would
            # double the head's memory; there are few chunks per call.
            if need_head:
                g = grads.pop(0)
                grad_head = g if grad_head is None else grad_head.add_(g)
            for k, need in enumerate(need_params):
                if need:
                    g = grads.pop(0)
                    grad_params[k] = g if grad_params[k] is None else grad_params[k].add_(g)
        ctx.n_params = len(param_values)
        ctx.save_for_backward(grad_rows, grad_head, *grad_params)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        grad_rows, grad_head, *grad_params = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_total.to(g.dtype)  # noqa: E731
        return (scale(grad_rows), None, None, None, None, None, scale(grad_head), *map(scale, grad_params))


def logit_lens_ce(hidden, norm, head_weight, labels, chunk_size=1024, softcap=None, reduction="mean",
                  freeze_head=True):
    """Cross-entropy of the output head read off a hidden state (logit lens), chunked, fused with its gradient.

        logits[b, t] = softcap(W_out · norm(hidden[b, t]))          softcap(z) = c · tanh(z / c), or z if c is None
        loss         = Σ_{(b,t): labels[b,t] != -100} −log softmax(logits[b, t])[labels[b, t]]

    hidden [B, T, D] (any float dtype), norm: the model's final norm (a module mapping [.., D] -> [.., D]),
    head_weight [V, D], labels [B, T] integer, already shifted: labels[b, t] is the token to predict from
    position t, -100 = not supervised. softcap: Gemma-2's final-logit softcap c (None for LLaMA).
    Returns an fp32 (or wider) scalar: the sum (reduction="sum"), or the mean over supervised tokens
    ("mean"; 0.0, not NaN, when there are none). For a loss normalised over a whole optimizer step, use "sum"
    and divide by the global token count.

    freeze_head=True (L_LC, L_ET): head_weight and the norm's parameters receive no gradient (S for LC's head;
    I for ET and for the norm); the hidden state does. freeze_head=False (L_TFT): all of them train as usual.

    Ours (I): the final norm is part of the lens; logits are fp32; only supervised positions are gathered and
    processed `chunk_size` tokens at a time, and each chunk's gradients are formed while its logits exist (the
    loss is a sum over rows), so no pass holds more than one chunk's [chunk_size, V] logits, nothing with a
    V dimension is kept for backward, and no chunk is recomputed. Parameters
    are read from `norm` at call time: under FSDP2 they must be the unsharded tensors of a running forward
    (call from `forward` or a method registered with `register_fsdp_forward_method`, with the norm and head
    in that module's FSDP unit, e.g. the root; not in a unit of their own, whose hooks would never run).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"logit_lens_ce: reduction={reduction!r}; expected 'mean' or 'sum'")
    if not isinstance(norm, torch.nn.Module):
        raise ValueError(f"logit_lens_ce: norm is a {type(norm).__name__}; "
                         "expected the model's final norm as an nn.Module")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"logit_lens_ce: chunk_size={chunk_size!r}; expected a positive int")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"logit_lens_ce: softcap={softcap!r}; expected a positive number or None")
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"logit_lens_ce: hidden has shape {tuple(hidden.shape)} and dtype {hidden.dtype}; "
                         "expected a float [B, T, D] tensor")
    if head_weight.dim() != 2 or head_weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"logit_lens_ce: head_weight has shape {tuple(head_weight.shape)}; "
                         f"expected [V, {hidden.shape[2]}] to match hidden's D")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"logit_lens_ce: labels have shape {tuple(labels.shape)}; "
                         f"expected {tuple(hidden.shape[:2])} to match hidden's [B, T]")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"logit_lens_ce: labels have dtype {labels.dtype}; "
                         "expected an integer tensor (torch.long)")
    if labels.device != hidden.device:
        raise ValueError(f"logit_lens_ce: labels are on {labels.device} and hidden on {hidden.device}; "
                         "expected one device")

    flat_labels = labels.reshape(-1).long()
    keep = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)  # [n]
    targets = flat_labels.index_select(0, keep)
    vocab = head_weight.shape[0]
    if keep.numel() and (targets.min() < 0 or targets.max() >= vocab):
        bad = targets[(targets < 0) | (targets >= vocab)][0].item()
        raise ValueError(f"logit_lens_ce: labels contain {bad}; expected token ids in [0, {vocab}) or -100")
    rows = hidden.reshape(-1, hidden.shape[2]).index_select(0, keep)  # [n, D]

    named = list(norm.named_parameters())
    names, values = tuple(name for name, _ in named), tuple(value for _, value in named)
    for name, value in (("head_weight", head_weight), *((f"norm.{n}", v) for n, v in named)):
        if type(value).__name__ == "DTensor":
            raise ValueError(f"logit_lens_ce: {name} is a sharded DTensor; under FSDP2 call this from forward "
                             "or a method registered with register_fsdp_forward_method, with the norm and head "
                             "in that module's FSDP unit")
    if freeze_head:
        # Stop-gradient on the head path only: the hidden state still gets its gradient.
        head_weight = head_weight.detach()
        values = tuple(v.detach() for v in values)
    total = _ChunkedLogitLensCE.apply(rows, targets, chunk_size, softcap, norm, names, head_weight, *values)
    if reduction == "mean":
        return total / max(keep.numel(), 1)
    return total


def _pool(hidden, mask, pooling, mask_name):
    """[B, T, D] hidden states -> [B, D] fp32 vectors over the positions where mask is 1."""
    if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"feature_cosine_loss: {mask_name} has values other than 0 and 1; expected a 0/1 mask")
    mask = mask != 0  # [B, T]
    empty = (~mask.any(dim=1)).nonzero()
    if empty.numel():
        raise ValueError(f"feature_cosine_loss: {mask_name} row {empty[0].item()} marks no token; "
                         "expected at least one token to pool per example")
    # fp32: pooling and cosine
    if pooling == "mean":
        weights = mask.float()
        return torch.einsum("btd,bt->bd", hidden.float(), weights) / weights.sum(dim=1, keepdim=True)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(dim=1)  # [B]: the largest marked position
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()


def feature_cosine_loss(h_student, h_teacher, mask_student, mask_teacher, pooling="mean", detach_teacher=True,
                        reduction="mean"):
    """Cosine distance between pooled hidden states of a student and a teacher sequence (DFT-feature).

        loss[b] = 1 − cos(pool(h_student[b], mask_student[b]), pool(h_teacher[b], mask_teacher[b]))

    The paper's (S) two uses: L_LC = 1 − cos(h_i(x_en), h_i(x_tgt)) and L_ET = 1 − cos(h_N(x_en), h_j(x_tgt));
    the student is the target-language side, the teacher the English side.
    h_student [B, T_s, D], h_teacher [B, T_t, D] (the lengths may differ), masks [B, T_s] and [B, T_t]: 1 on the
    tokens to pool over. Returns fp32: the mean over the batch ("mean"), the sum ("sum") or [B] ("none").

    Ours (I): the sequences have different lengths, so states are pooled first -- pooling="mean" is the masked
    mean, "last" the state at the last marked position; detach_teacher=True stops the gradient through the
    English (teacher) side. An all-zero mask row is an error, not a silent NaN.
    """
    if pooling not in ("mean", "last"):
        raise ValueError(f"feature_cosine_loss: pooling={pooling!r}; expected 'mean' or 'last'")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"feature_cosine_loss: reduction={reduction!r}; expected 'mean', 'sum' or 'none'")
    for name, h in (("h_student", h_student), ("h_teacher", h_teacher)):
        if h.dim() != 3 or not h.is_floating_point():
            raise ValueError(f"feature_cosine_loss: {name} has shape {tuple(h.shape)} and dtype {h.dtype}; "
                             "expected a float [B, T, D] tensor")
    if h_student.shape[0] != h_teacher.shape[0] or h_student.shape[2] != h_teacher.shape[2]:
        raise ValueError(f"feature_cosine_loss: h_student {tuple(h_student.shape)} and h_teacher "
                         f"{tuple(h_teacher.shape)} differ in B or D; expected [B, T_s, D] and [B, T_t, D]")
    for name, mask, h in (("mask_student", mask_student, h_student), ("mask_teacher", mask_teacher, h_teacher)):
        if mask.shape != h.shape[:2]:
            raise ValueError(f"feature_cosine_loss: {name} has shape {tuple(mask.shape)}; "
                             f"expected {tuple(h.shape[:2])} to match its hidden states")
        if mask.device != h.device:
            raise ValueError(f"feature_cosine_loss: {name} is on {mask.device} and its hidden states on "
                             f"{h.device}; expected one device")

    if detach_teacher:
        h_teacher = h_teacher.detach()  # stop-gradient: the English side is the teacher (I)
    student = _pool(h_student, mask_student, pooling, "mask_student")  # [B, D]
    teacher = _pool(h_teacher, mask_teacher, pooling, "mask_teacher")  # [B, D]
    loss = 1.0 - F.cosine_similarity(student, teacher, dim=-1)  # [B]
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
