"""The chunked per-sample loss against the plain fp32 cross-entropy (value and gradient), and what it keeps
for backward: no fp32 copy of the logits."""
import pytest
import torch

from perta_fast.loss import per_sample_loss, reference_per_sample_loss, token_nll

# fp32: a different summation order only; bf16/fp16 gradients are rounded once to the logits' dtype
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2 ** -7, atol=1e-6),
       torch.float16: dict(rtol=2 ** -10, atol=1e-7)}


def batch(dtype, b=3, t=7, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, 5:] = -100  # padding
    labels[2, :] = -100  # a row with no answer at all
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 4, None])
def test_loss_and_gradient_equal_plain_cross_entropy(dtype, rows, monkeypatch):
    import perta_fast.loss as loss

    if rows:  # force chunks smaller than the batch, including one token at a time
        monkeypatch.setattr(loss, "chunk_rows", lambda vocab: rows)
    logits, labels = batch(dtype)
    x = logits.clone().requires_grad_(True)
    ref = logits.clone().requires_grad_(True)
    weights = torch.tensor([0.7, -1.3, 2.0])
    got, want = per_sample_loss(x, labels), reference_per_sample_loss(ref, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # both fp32 math on the same inputs
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad, ref.grad, **TOL[dtype])
    assert not x.grad[2].any()  # no answer: no gradient


def test_every_position_ignored_gives_zero_loss_and_gradient():
    logits = torch.randn(2, 4, 9, requires_grad=True)
    labels = torch.full((2, 4), -100)
    loss = per_sample_loss(logits, labels)
    loss.sum().backward()
    assert not loss.any() and not logits.grad.any()


def test_token_nll_equals_cross_entropy_on_flat_logits():
    logits = torch.randn(5, 11)
    target = torch.tensor([0, 3, -100, 10, 4])
    got = token_nll(logits, target, rows=2)
    want = torch.nn.functional.cross_entropy(logits, target, reduction="none", ignore_index=-100)
    torch.testing.assert_close(got, want)


def test_backward_keeps_no_fp32_copy_of_the_logits():
    """Bytes autograd saves for backward beyond the logits themselves: the plain way saves fp32 logits
    (log-softmax); the chunked loss only 4 bytes per token (the log-sum-exp) and the targets."""
    b, t, v = 4, 32, 4096
    logits = torch.randn(b, t, v, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, v, (b, t))

    def saved_bytes(fn):
        seen = []

        def pack(x):
            if x.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
                seen.append(x.numel() * x.element_size())
            return x
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn(logits, labels).sum()
        return sum(seen)

    assert saved_bytes(reference_per_sample_loss) >= 4 * b * (t - 1) * v
    assert saved_bytes(per_sample_loss) <= 16 * b * t  # lse (fp32) and targets (int64)
