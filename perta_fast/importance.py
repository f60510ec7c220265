"""Parameter importance on a data set: |mean gradient| ("grad") or the exact diagonal empirical
Fisher ("fisher": mean over samples of the squared per-sample gradient).

The exact Fisher never materialises a per-sample gradient of the whole model. Hooks capture each
layer's input X and output gradient G during one batched backward; a Linear's per-sample gradient
is G_bᵀX_b, a norm's is Σ_t G⊙x̂, an embedding's is an index_add of G over the sample's tokens.
All weights are frozen so autograd skips their (batched) weight gradients entirely.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .data import QA, batches, data_hash, encode, pad_id, per_sample_loss
from .errors import PertaError
from .io import Checkpoint, atomic_file, check_output_path
from .ops import CHUNK_ELEMENTS, accumulate_, add_squares_, linear_fisher_

METHODS = ("grad", "fisher")


def _unique_params(model) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())  # tied parameters appear once, under their first name


def _is_rms_norm(m: nn.Module) -> bool:
    return "RMSNorm" in type(m).__name__ and isinstance(getattr(m, "weight", None), nn.Parameter) \
        and m.weight.dim() == 1 and not isinstance(getattr(m, "bias", None), nn.Parameter)


def _rms_eps(m: nn.Module) -> float:
    return float(getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6)))


class _ExactFisher:
    """Accumulates Σ_b g_b² for every parameter of `model` from hook-captured X and G."""

    def __init__(self, model: nn.Module):
        self.model = model
        params = _unique_params(model)
        self.name_of = {id(p): n for n, p in params.items()}
        self.acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
        self.tied_linear: dict[int, tuple] = {}  # weight id -> (X, G) of a Linear sharing an embedding's weight
        self.embedded: dict[int, tuple] = {}  # weight id -> (ids, G) of that embedding
        self.mask = None
        self.called: set[int] = set()
        self.handles = []
        covered = set()
        emb_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        for m in model.modules():
            if isinstance(m, nn.Linear):
                self.handles.append(m.register_forward_hook(self._linear_hook(id(m.weight) in emb_weights)))
                covered.update(id(p) for p in (m.weight, m.bias) if p is not None)
            elif isinstance(m, nn.Embedding):
                self.handles.append(m.register_forward_hook(self._embedding_hook))
                covered.add(id(m.weight))
            elif _is_rms_norm(m) or isinstance(m, nn.LayerNorm):
                self.handles.append(m.register_forward_hook(self._norm_hook))
                covered.update(id(p) for p in (m.weight, getattr(m, "bias", None)) if isinstance(p, nn.Parameter))
        missing = [n for n, p in params.items() if id(p) not in covered]
        if missing:
            self.close()
            raise PertaError(f"exact fisher does not support parameter {missing[0]} "
                             f"({len(missing)} unsupported); supported: Linear, Embedding, RMSNorm, LayerNorm")
        self.requires_grad = {n: p.requires_grad for n, p in params.items()}
        for p in params.values():
            p.requires_grad_(False)

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        for n, p in _unique_params(self.model).items():
            p.requires_grad_(getattr(self, "requires_grad", {}).get(n, p.requires_grad))

    def _once(self, module):
        """Per-sample squares are exact only if each weight's contribution arrives in one piece."""
        if id(module) in self.called:
            raise PertaError(f"exact fisher: module {type(module).__name__} runs twice in one forward pass "
                             "(shared weights); its per-sample gradient cannot be squared piecewise")
        self.called.add(id(module))

    def _add(self, param, per_sample_sq_sum: torch.Tensor):
        self.acc[self.name_of[id(param)]].add_(per_sample_sq_sum)

    def _linear_hook(self, tied: bool):
        def hook(module, inputs, output):
            self._once(module)
            x = inputs[0]

            def on_grad(g):
                if tied:  # summed with the embedding's contribution before squaring, after backward
                    self.tied_linear[id(module.weight)] = (x.detach(), g.detach())
                else:
                    self._linear_grads(module, x.detach(), g.detach())
            if output.requires_grad:
                output.register_hook(on_grad)
        return hook

    def _linear_grads(self, module, x, g):
        linear_fisher_(self.acc[self.name_of[id(module.weight)]], x, g)
        if module.bias is not None:
            b = x.shape[0]
            self._add(module.bias, g.reshape(b, -1, module.out_features).float().sum(1).square_().sum(0))

    def _embedding_hook(self, module, inputs, output):
        self._once(module)
        ids = inputs[0]
        output.requires_grad_(True)  # weights are frozen: this is where the backward pass starts

        def on_grad(g):
            self.embedded[id(module.weight)] = (module, ids, g.detach())
        output.register_hook(on_grad)
        return output

    def _norm_hook(self, module, inputs, output):
        self._once(module)
        x = inputs[0].detach()

        def on_grad(g):
            xf = x.float()
            if isinstance(module, nn.LayerNorm):
                x_hat = F.layer_norm(xf, module.normalized_shape, eps=module.eps)
            else:
                x_hat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _rms_eps(module))
            x_hat = x_hat.to(x.dtype).float()  # as the module rounds it before scaling by the weight
            gf = g.detach().float().reshape(g.shape[0], -1, g.shape[-1])
            x_hat = x_hat.reshape(gf.shape)
            self._add(module.weight, (gf * x_hat).sum(1).square_().sum(0))
            if isinstance(getattr(module, "bias", None), nn.Parameter):
                self._add(module.bias, gf.sum(1).square_().sum(0))
        if output.requires_grad:
            output.register_hook(on_grad)

    def _embedding_grads(self):
        """Embeddings (and tied output layers) once the whole backward has run."""
        for wid, (module, ids, g_emb) in self.embedded.items():
            keep = self.mask.bool()  # padding positions never count, and autograd gives the
            if module.padding_idx is not None:  # padding_idx row no embedding gradient at all
                keep = keep & (ids != module.padding_idx)
            mask = keep.to(g_emb.dtype).unsqueeze(-1)
            g_emb = (g_emb.float() * mask).reshape(ids.shape[0], -1, g_emb.shape[-1])
            ids = ids.reshape(ids.shape[0], -1)
            lin = self.tied_linear.pop(wid, None)
            vocab, dim = module.weight.shape
            if lin is None:  # a sample touches few rows: square per-row sums of that sample only
                for b in range(ids.shape[0]):
                    rows, inverse = torch.unique(ids[b], return_inverse=True)
                    per_row = torch.zeros(len(rows), dim, device=g_emb.device).index_add_(0, inverse, g_emb[b])
                    self.acc[self.name_of[wid]].index_add_(0, rows, per_row.square_())
                continue
            x, g = lin
            b_total = x.shape[0]
            x = x.reshape(b_total, -1, x.shape[-1]).float()
            g = g.reshape(b_total, -1, g.shape[-1]).float()
            chunk = max(1, CHUNK_ELEMENTS // (vocab * dim))
            for s in range(0, b_total, chunk):
                per_sample = torch.bmm(g[s:s + chunk].transpose(1, 2), x[s:s + chunk])
                flat = per_sample.view(-1, dim)
                offsets = torch.arange(per_sample.shape[0], device=ids.device).unsqueeze(1) * vocab
                flat.index_add_(0, (ids[s:s + chunk] + offsets).reshape(-1),
                                g_emb[s:s + chunk].reshape(-1, dim))
                add_squares_(self.acc[self.name_of[id(module.weight)]], per_sample)
        if self.tied_linear:
            raise RuntimeError("a tied Linear weight saw no embedding gradient")
        self.embedded.clear()

    def step(self, ids, mask, labels) -> float:
        self.mask = mask
        self.called.clear()
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        losses = per_sample_loss(logits, labels)
        losses.sum().backward()  # each sample's G is then the gradient of its own loss
        self._embedding_grads()
        return float(losses.detach().sum())


class _MeanGradient:
    """Accumulates the gradient of the set's loss, freeing each parameter's .grad as soon as it lands."""

    def __init__(self, model: nn.Module, n_total: int):
        self.model, self.n_total = model, n_total
        params = _unique_params(model)
        self.acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
        self.requires_grad = {n: p.requires_grad for n, p in params.items()}
        self.handles = []
        for n, p in params.items():
            p.requires_grad_(True)
            self.handles.append(p.register_post_accumulate_grad_hook(self._take(self.acc[n])))

    @staticmethod
    def _take(acc):
        def hook(p):  # read the gradient once, then free it: no full gradient copy is ever held
            accumulate_(acc, p.grad, square=False)
            p.grad = None
        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        for n, p in _unique_params(self.model).items():
            p.requires_grad_(self.requires_grad[n])

    def step(self, ids, mask, labels) -> float:
        losses = per_sample_loss(self.model(input_ids=ids, attention_mask=mask).logits, labels)
        (losses.sum() / self.n_total).backward()
        return float(losses.detach().sum())


def estimate_importance(model, tokenizer, rows: list[QA], method: str, batch_size: int = 8,
                        max_length: int = 256, progress: bool = True, desc: str = "importance") -> dict[str, torch.Tensor]:
    """Per-parameter scores (fp32, on CPU) of `model` on `rows`: grad = |∇L_set|, fisher = mean_i (∇L_i)²."""
    from tqdm import tqdm

    if method not in METHODS:
        raise PertaError(f"unknown importance method {method!r} (expected one of {', '.join(METHODS)})")
    if not rows:
        raise PertaError(f"{desc}: the set is empty")
    encoded = encode(tokenizer, rows, max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    acc = _ExactFisher(model) if method == "fisher" else _MeanGradient(model, len(encoded))
    try:
        with tqdm(total=len(encoded), desc=desc, unit="sample", disable=not progress) as bar:
            for ids, mask, labels in batches(encoded, batch_size, pad_id(tokenizer)):
                acc.step(ids.to(device), mask.to(device), labels.to(device))
                bar.update(ids.shape[0])
    finally:
        acc.close()
        model.train(was_training)
    if method == "fisher":
        return {n: (a / len(encoded)).cpu() for n, a in acc.acc.items()}
    return {n: a.abs_().cpu() for n, a in acc.acc.items()}


def compute_importance(model_dir: str | Path, forget: list[QA], retain: list[QA], method: str = "grad",
                       batch_size: int = 8, max_length: int = 256, max_samples: int | None = None,
                       device: str | None = None, progress: bool = True) -> tuple[dict, dict]:
    """(tensors, metadata) for an importance file: forget/<name> and retain/<name> scores at `model_dir`."""
    from .models import load_model

    if max_samples:
        forget, retain = forget[:max_samples], retain[:max_samples]
    for label, rows in (("forget", forget), ("retain", retain)):
        if not rows:
            raise PertaError(f"the {label} set is empty")
    t0 = time.perf_counter()
    model, tok = load_model(model_dir, device)
    names_in_checkpoint = set(Checkpoint(model_dir).names())
    tensors = {}
    for label, rows in (("forget", forget), ("retain", retain)):
        scores = estimate_importance(model, tok, rows, method, batch_size, max_length, progress, desc=f"{method} {label}")
        for name, s in scores.items():
            if not torch.isfinite(s).all():
                raise PertaError(f"{model_dir}: {label} importance of {name} is NaN/Inf (does the checkpoint hold NaN weights?)")
            if name not in names_in_checkpoint:
                raise PertaError(f"{model_dir}: parameter {name} is not stored in the checkpoint under that name")
            tensors[f"{label}/{name}"] = s
    import transformers

    meta = {"method": method, "n_forget": str(len(forget)), "n_retain": str(len(retain)),
            "forget_sha256": data_hash(forget), "retain_sha256": data_hash(retain),
            "checkpoint": str(Path(model_dir).resolve()), "batch_size": str(batch_size),
            "max_length": str(max_length), "estimator": "exact per-sample" if method == "fisher" else "mean gradient",
            "versions": json.dumps({"perta_fast": __version__, "torch": torch.__version__,
                                    "transformers": transformers.__version__}),
            "seconds": f"{time.perf_counter() - t0:.2f}"}
    return tensors, meta


def save_importance(tensors: dict, metadata: dict, out: str | Path, overwrite: bool = False,
                    inputs: tuple = ()) -> Path:
    from safetensors.torch import save_file

    with atomic_file(out, overwrite, inputs) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(out)


def importance_file(model_dir: str | Path, forget: list[QA], retain: list[QA], out: str | Path, method: str = "grad",
               batch_size: int = 8, max_length: int = 256, max_samples: int | None = None, device: str | None = None,
               overwrite: bool = False, progress: bool = True) -> dict:
    """Estimate and write an importance file; the output is checked before any work is done."""
    check_output_path(Path(out), overwrite, (model_dir,))
    tensors, meta = compute_importance(model_dir, forget, retain, method, batch_size, max_length, max_samples,
                                       device, progress)
    save_importance(tensors, meta, out, overwrite, inputs=(model_dir,))
    return meta
