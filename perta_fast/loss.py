"""Per-sample answer loss, computed from the logits in chunks of tokens so that no fp32 copy of the whole
batch's logits exists, forward or backward.

The plain way (`logits.float()` then cross-entropy) holds the batch's logits three times over in fp32 at
backward (the copy, the saved log-softmax and its gradient): 12 bytes per token and vocabulary entry, 3 GB
for 8 × 2048 tokens of a 128k vocabulary. Here the forward keeps only each token's log-sum-exp (4 bytes
per token), and the backward re-forms the softmax one chunk of tokens at a time, writing the gradient
straight into a tensor of the logits' own dtype: the loss then adds one logits-sized gradient in the
model dtype plus one fp32 chunk (at most CHUNK_BYTES, worked in place) to the logits the model produced.
"""
from __future__ import annotations

import torch

CHUNK_BYTES = 1 << 26  # fp32 values of one chunk of tokens × vocabulary (64 MiB)
IGNORE = -100


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * vocab))


class _TokenNLL(torch.autograd.Function):
    """-log softmax(x)[target] per row of x (n, V), 0 where target is IGNORE; fp32 math per chunk."""

    @staticmethod
    def forward(ctx, x, target, rows):
        nll = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        lse = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        for r0 in range(0, x.shape[0], rows):
            t = target[r0:r0 + rows]
            valid = t != IGNORE
            if not bool(valid.any()):  # prompt and padding tokens: no loss, no gradient, nothing to form
                continue
            # one fp32 copy of the chunk, worked in place: the chunk is the only fp32 tensor of its size
            xf = x[r0:r0 + rows].to(torch.float32, copy=True)
            picked = xf.gather(1, t.clamp_min(0)[:, None])[:, 0]
            top = xf.amax(dim=-1, keepdim=True)
            chunk_lse = xf.sub_(top).exp_().sum(dim=-1).log_().add_(top[:, 0])
            lse[r0:r0 + rows] = chunk_lse
            nll[r0:r0 + rows] = torch.where(valid, chunk_lse - picked, 0.0)
            del xf
        ctx.save_for_backward(x, target, lse)
        ctx.rows = rows
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        x, target, lse = ctx.saved_tensors
        grad = torch.zeros_like(x)
        for r0 in range(0, x.shape[0], ctx.rows):
            t = target[r0:r0 + ctx.rows]
            valid = t != IGNORE
            if not bool(valid.any()):
                continue
            # d nll / d x = softmax(x) - onehot(target), scaled by the incoming gradient, 0 on ignored rows
            g = x[r0:r0 + ctx.rows].to(torch.float32, copy=True).sub_(lse[r0:r0 + ctx.rows, None]).exp_()
            g.scatter_add_(1, t.clamp_min(0)[:, None], torch.full_like(g[:, :1], -1.0))
            g.mul_(torch.where(valid, grad_nll[r0:r0 + ctx.rows], 0.0)[:, None])
            grad[r0:r0 + ctx.rows] = g
        return grad, None, None


def token_nll(logits: torch.Tensor, target: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of each position (fp32, shape of `target`), IGNORE positions 0; `logits` (..., V) in
    any dtype. `rows`: tokens per fp32 chunk (default: CHUNK_BYTES' worth)."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)  # a view for the contiguous logits a model returns
    nll = _TokenNLL.apply(flat, target.reshape(-1), rows or chunk_rows(vocab))
    return nll.view(target.shape)


def per_sample_loss(logits, labels):
    """Mean cross-entropy over each sample's answer tokens, accumulated in fp32: shape (batch,). Position t
    predicts labels[t + 1]; the last position predicts nothing (its target is IGNORE), which keeps the
    logits whole instead of slicing them (a slice would have to be copied to be chunked)."""
    target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)
    nll = token_nll(logits, target)
    count = (target != IGNORE).sum(1).clamp_min(1)
    return nll.sum(1) / count


def reference_per_sample_loss(logits, labels):
    """The plain computation (an fp32 copy of all logits): the oracle for per_sample_loss, and the form
    torch.func's transforms (vmap, grad) can trace."""
    import torch.nn.functional as F

    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none",
                          ignore_index=IGNORE).view(target.shape)
    return nll.sum(1) / (target != IGNORE).sum(1).clamp_min(1)
