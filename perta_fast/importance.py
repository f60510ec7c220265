"""Parameter importance on a data set: |mean gradient| ("grad") or the exact diagonal empirical
Fisher ("fisher": mean over samples of the squared per-sample gradient).

The exact Fisher never materialises a per-sample gradient of the whole model. Hooks capture each
layer's input X and output gradient G during one batched backward; a Linear's per-sample gradient
is G_bᵀX_b, a norm's is Σ_t G⊙x̂, an embedding's is an index_add of G over the sample's tokens.
All weights are frozen so autograd skips their (batched) weight gradients entirely.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import __version__, distributed, dtypes
from .console import bar, log
from .data import QA, collate, data_hash, encode, logits_of, pad_id
from .errors import PertaError
from .io import Checkpoint, SafetensorsFile, SafetensorsWriter, content_sha256
from .loss import per_sample_loss
from .ops import accumulate_, add_squares_, linear_fisher_, per_sample_tiles
from .outputs import (_umask_mode, atomic_file, check_output_path, kill_point, publish, remove_leftover,
                      remove_stale_temps, resume_dir, resume_state)
from .profiling import host_available_bytes, release_freed_memory

METHODS = ("grad", "fisher")


def _unique_params(model, names=None) -> dict[str, nn.Parameter]:
    """Tied parameters appear once, under their first name; `names` (None: all) keeps only those
    (a LoRA adapter's targets: every other parameter has τ = 0, so its importance is never needed)."""
    params = dict(model.named_parameters())
    if names is None:
        return params
    unknown = sorted(set(names) - set(params))
    if unknown:
        raise PertaError(f"importance: the model has no parameter {unknown[0]!r} (adapter for another model?)")
    return {n: p for n, p in params.items() if n in names}


def _in_backward() -> bool:
    """True while autograd runs a backward pass: a forward hook firing then is gradient checkpointing
    recomputing a layer."""
    return torch._C._current_graph_task_id() != -1


def _checkpointed_modules(model) -> set[int]:
    """ids of modules inside layers that gradient checkpointing recomputes during backward."""
    ids = set()
    for layer in model.modules():
        if getattr(layer, "gradient_checkpointing", False) and layer.training:
            ids.update(id(m) for m in layer.modules())
    return ids


def _is_rms_norm(m: nn.Module) -> bool:
    return "RMSNorm" in type(m).__name__ and isinstance(getattr(m, "weight", None), nn.Parameter) \
        and m.weight.dim() == 1 and not isinstance(getattr(m, "bias", None), nn.Parameter)


def _rms_eps(m: nn.Module) -> float:
    return float(getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6)))


def _accumulators(params: dict, offload: bool) -> dict[str, torch.Tensor]:
    """fp32 zeros beside each parameter, or all in host memory when offloaded (not pinned: the transfers
    land in temporaries, and tens of GB of page-locked memory is what a host can least spare)."""
    return {n: torch.zeros(p.shape, dtype=torch.float32, device="cpu" if offload else p.device)
            for n, p in params.items()}


class _ExactFisher:
    """Accumulates Σ_b g_b² for every parameter of `model` from hook-captured X and G."""

    def __init__(self, model: nn.Module, names=None, offload: bool = False):
        self.model = model
        params = _unique_params(model, names)
        self.name_of = {id(p): n for n, p in params.items()}
        self.acc = _accumulators(params, offload)
        self.offload = offload
        self.tied_linear: dict[int, tuple] = {}  # weight id -> (X, G) of a Linear sharing an embedding's weight
        self.embedded: dict[int, tuple] = {}  # weight id -> (ids, G) of that embedding
        self.halves: dict[int, dict] = {}  # module id -> X or G, whichever came first (gradient checkpointing)
        self.awaiting: set[int] = set()  # checkpointed modules whose X and G are still to meet this step
        self.checkpointed = _checkpointed_modules(model)
        self.mask = None
        self.called: set = set()
        self.handles = []
        covered = set()
        emb_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        wanted = lambda *ps: any(id(p) in self.name_of for p in ps if isinstance(p, nn.Parameter))  # noqa: E731
        for m in model.modules():
            if isinstance(m, nn.Linear) and wanted(m.weight, m.bias):
                handle = self._tied_linear if id(m.weight) in emb_weights else self._linear_grads
                self.handles.append(m.register_forward_hook(self._hook(handle)))
                covered.update(id(p) for p in (m.weight, m.bias) if p is not None)
            elif isinstance(m, nn.Embedding):  # always hooked: with frozen weights, backward starts here
                self.handles.append(m.register_forward_hook(self._embedding_hook))
                covered.add(id(m.weight))
            elif (_is_rms_norm(m) or isinstance(m, nn.LayerNorm)) and wanted(m.weight, getattr(m, "bias", None)):
                self.handles.append(m.register_forward_hook(self._hook(self._norm_grads)))
                covered.update(id(p) for p in (m.weight, getattr(m, "bias", None)) if isinstance(p, nn.Parameter))
        missing = [n for n, p in params.items() if id(p) not in covered]
        if missing:
            self.close()
            raise PertaError(f"exact fisher does not support parameter {missing[0]} "
                             f"({len(missing)} unsupported); supported: Linear, Embedding, RMSNorm, LayerNorm")
        self.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        for n, p in self.model.named_parameters():
            p.requires_grad_(getattr(self, "requires_grad", {}).get(n, p.requires_grad))

    def _once(self, module):
        """Per-sample squares are exact only if each weight's contribution arrives in one piece."""
        if id(module) in self.called:
            raise PertaError(f"exact fisher: module {type(module).__name__} runs twice in one forward pass "
                             "(shared weights); its per-sample gradient cannot be squared piecewise")
        self.called.add(id(module))

    def _hook(self, handle):
        """A forward hook that calls `handle(module, X, G)` once the layer's input X and output gradient G
        are both known. Without checkpointing X is held from the forward pass. Under gradient checkpointing
        it is not (that would keep every activation checkpointing frees): it comes from backward's
        recompute of the layer, which may run before or after G arrives, so whichever comes second
        completes the pair."""
        def hook(module, inputs, output):
            key = id(module)
            if _in_backward():
                if key in self.awaiting:
                    self._meet(key, module, handle, x=inputs[0].detach())
                return
            self._once(module)
            self._per_sample_input(module, inputs[0])
            if not output.requires_grad:
                return
            if key in self.checkpointed:
                self.awaiting.add(key)
                output.register_hook(lambda g: self._meet(key, module, handle, g=g.detach()))
            else:
                x = inputs[0].detach()
                output.register_hook(lambda g: handle(module, x, g.detach()))
        return hook

    def _per_sample_input(self, module, x):
        """The per-sample squares need axis 0 of the input to be the sample: a module fed tokens
        flattened across the batch (MoE experts take their routed tokens so) would get per-token squares,
        a different and silently wrong estimate."""
        batch = self.mask.shape[0]
        if x.dim() < 3 or x.shape[0] != batch:
            name = next((self.name_of[id(p)] for p in module.parameters(recurse=False) if id(p) in self.name_of),
                        type(module).__name__)
            raise PertaError(f"exact fisher: {name} receives inputs of shape {tuple(x.shape)}, not (batch {batch}, "
                             "tokens, features) (tokens flattened across samples, as MoE experts take them): its "
                             "per-sample squares cannot be formed; use --method grad")

    def _meet(self, key, module, handle, **half):
        pair = self.halves.setdefault(key, {})
        pair.update(half)
        if len(pair) == 2:
            del self.halves[key]
            self.awaiting.discard(key)
            handle(module, pair["x"], pair["g"])

    def _add(self, param, per_sample_sq_sum: torch.Tensor):
        if id(param) in self.name_of:
            acc = self.acc[self.name_of[id(param)]]
            acc.add_(per_sample_sq_sum.to(acc.device))

    @contextlib.contextmanager
    def _into(self, param):
        """What this batch's squares for `param` are added into on the math device: its accumulator, or,
        offloaded, a zeroed buffer there that is added to the host accumulator once filled (one transfer
        per parameter per batch, and never more than one parameter's buffer on the device)."""
        acc = self.acc[self.name_of[id(param)]]
        if not self.offload:
            yield acc
            return
        stage = torch.zeros(acc.shape, dtype=torch.float32, device=param.device)
        yield stage
        acc.add_(stage.to(acc.device))

    def _tied_linear(self, module, x, g):
        """Summed with the embedding's contribution before squaring, after backward."""
        self.tied_linear[id(module.weight)] = (x, g)

    def _linear_grads(self, module, x, g):
        if id(module.weight) in self.name_of:
            with self._into(module.weight) as acc:
                linear_fisher_(acc, x, g)
        if module.bias is not None:
            b = x.shape[0]
            self._add(module.bias, g.reshape(b, -1, module.out_features).float().sum(1).square_().sum(0))

    def _embedding_hook(self, module, inputs, output):
        if _in_backward():  # an embedding inside a recomputed layer: its gradient comes from the first pass
            return output
        self._once(module)
        ids = inputs[0]
        output.requires_grad_(True)  # weights are frozen: this is where the backward pass starts

        def on_grad(g):
            self.embedded[id(module.weight)] = (module, ids, g.detach())
        output.register_hook(on_grad)
        return output

    def _norm_grads(self, module, x, g):
        xf = x.float()
        if isinstance(module, nn.LayerNorm):
            x_hat = F.layer_norm(xf, module.normalized_shape, eps=module.eps)
        else:
            x_hat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _rms_eps(module))
        x_hat = x_hat.to(x.dtype).float()  # as the module rounds it before scaling by the weight
        gf = g.float().reshape(g.shape[0], -1, g.shape[-1])
        x_hat = x_hat.reshape(gf.shape)
        self._add(module.weight, (gf * x_hat).sum(1).square_().sum(0))
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            self._add(module.bias, gf.sum(1).square_().sum(0))

    def _embedding_grads(self):
        """Embeddings (and tied output layers) once the whole backward has run."""
        for wid, (module, ids, g_emb) in self.embedded.items():
            if wid not in self.name_of:
                continue
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
                    acc = self.acc[self.name_of[wid]]
                    acc.index_add_(0, rows.to(acc.device), per_row.square_().to(acc.device))
                continue
            x, g = lin
            b_total = x.shape[0]
            x = x.reshape(b_total, -1, x.shape[-1]).float()
            g = g.reshape(b_total, -1, g.shape[-1])
            with self._into(module.weight) as acc:
                # per-sample gradients of a block of vocabulary rows at a time (lm_head part), plus the
                # embedding's gradient for the sample's tokens that fall in that block, summed then squared
                for v0, v1, chunk in per_sample_tiles(vocab, dim, b_total):
                    for s in range(0, b_total, chunk):
                        per_sample = torch.bmm(g[s:s + chunk, :, v0:v1].float().transpose(1, 2),
                                               x[s:s + chunk])
                        tokens = ids[s:s + chunk]
                        inside = (tokens >= v0) & (tokens < v1)
                        sample = torch.arange(tokens.shape[0], device=ids.device).unsqueeze(1).expand_as(tokens)
                        per_sample.view(-1, dim).index_add_(0, (sample * (v1 - v0) + tokens - v0)[inside],
                                                            g_emb[s:s + chunk][inside])
                        add_squares_(acc[v0:v1], per_sample)
                        del per_sample  # else the next chunk is formed while this one is held: twice the plan
        if self.tied_linear:
            raise RuntimeError("a tied Linear weight saw no embedding gradient")
        self.embedded.clear()

    def step(self, ids, mask, labels) -> float:
        self.mask = mask
        self.called.clear()
        # the logits are not kept beyond the loss (nor a KV cache): they are the largest activation
        losses = per_sample_loss(logits_of(self.model, ids, mask), labels)
        losses.sum().backward()  # each sample's G is then the gradient of its own loss
        if self.awaiting:
            raise RuntimeError(f"{len(self.awaiting)} checkpointed modules saw no recomputed input")
        self._embedding_grads()
        return float(losses.detach().sum())


class _MeanGradient:
    """Accumulates the gradient of the set's loss, freeing each parameter's .grad as soon as it lands."""

    def __init__(self, model: nn.Module, n_total: int, names=None, offload: bool = False):
        self.model, self.n_total = model, n_total
        params = _unique_params(model, names)
        self.acc = _accumulators(params, offload)
        self.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self.handles = []
        for p in model.parameters():
            p.requires_grad_(False)
        for n, p in params.items():
            p.requires_grad_(True)
            self.handles.append(p.register_post_accumulate_grad_hook(self._take(self.acc[n])))

    @staticmethod
    def _take(acc):
        def hook(p):  # read the gradient once, then free it: no full gradient copy is ever held
            accumulate_(acc, p.grad.to(acc.device), square=False)  # offloaded: moved in the model dtype
            p.grad = None
        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.requires_grad[n])

    def step(self, ids, mask, labels) -> float:
        losses = per_sample_loss(logits_of(self.model, ids, mask), labels)
        (losses.sum() / self.n_total).backward()
        return float(losses.detach().sum())


def estimate_importance(model, tokenizer, rows: list[QA], method: str, batch_size: int = 8,
                        max_length: int = 256, progress: bool = True, desc: str = "importance",
                        names=None, start: tuple[dict, int] | None = None, on_batch=None,
                        offload: bool = False) -> dict[str, torch.Tensor]:
    """Per-parameter scores (fp32, on CPU) of `model` on `rows`: grad = |∇L_set|, fisher = mean_i (∇L_i)².
    `names`: only these parameters (None: all). `offload`: the accumulators live in host memory and each
    parameter's batch contribution is moved there as it completes (for a GPU whose memory they would
    not fit). `start` = (accumulators, batches done) continues a run
    checkpointed by `on_batch(batches done, accumulators)`, which is called after every batch: the
    same batches in the same order, so the result is bit-identical to an uninterrupted run on the CPU."""
    if method not in METHODS:
        raise PertaError(f"unknown importance method {method!r} (expected one of {', '.join(METHODS)})")
    if not rows:
        raise PertaError(f"{desc}: the set is empty")
    encoded = encode(tokenizer, rows, max_length)
    device = next(model.parameters()).device
    rank, size = distributed.rank_and_size()  # under torchrun: batch i is this rank's when i % size == rank
    mine = {i: encoded[first:first + batch_size] for i, first in enumerate(range(0, len(encoded), batch_size))
            if i % size == rank}
    pad = pad_id(tokenizer)
    was_training = model.training
    model.eval()
    # the mean gradient divides by the whole set's size on every rank: the all-reduced sum is the mean
    acc = _ExactFisher(model, names, offload) if method == "fisher" else \
        _MeanGradient(model, len(encoded), names, offload)
    done = 0
    if start is not None:
        initial, done = start
        for n, t in initial.items():
            acc.acc[n].copy_(t)
    try:  # checkpointing's recompute must run each layer to its end, so every hook sees its input
        with torch.utils.checkpoint.set_checkpoint_early_stop(False), \
                bar(total=sum(map(len, mine.values())), desc=desc, unit="sample",
                    show=progress and rank == 0) as progress_bar:
            for i, batch in mine.items():
                if i >= done:
                    ids, mask, labels = collate(batch, pad)
                    acc.step(ids.to(device), mask.to(device), labels.to(device))
                    if device.type == "cpu":  # else each batch's freed activations stay private memory
                        release_freed_memory()
                    if on_batch is not None:
                        on_batch(i + 1, acc.acc)
                progress_bar.update(len(batch))
        distributed.sum_(acc.acc.values())
    finally:
        acc.close()
        model.train(was_training)
    # in place: a second model-sized copy of the scores would double this step's peak
    if method == "fisher":
        return {n: a.div_(len(encoded)).cpu() for n, a in acc.acc.items()}
    return {n: a.abs_().cpu() for n, a in acc.acc.items()}


def _load(model_dir, forget, retain, max_samples, device, dtype, gradient_checkpointing, adapter):
    """(model, tokenizer, forget, retain, names to score or None for all), inputs checked."""
    from .models import load_model

    if max_samples:
        forget, retain = forget[:max_samples], retain[:max_samples]
    for label, rows in (("forget", forget), ("retain", retain)):
        if not rows:
            raise PertaError(f"the {label} set is empty")
    names = None
    if adapter is not None:
        from .lora import adapter_targets

        names = adapter_targets(adapter, model_dir)
    model, tok = load_model(model_dir, device, dtype, gradient_checkpointing=gradient_checkpointing)
    stored = set(Checkpoint(model_dir).names())
    missing = [n for n in (names or dict(model.named_parameters())) if n not in stored]
    if missing:
        raise PertaError(f"{model_dir}: parameter {missing[0]} is not stored in the checkpoint under that name")
    return model, tok, forget, retain, names


def _checked(scores: dict, label: str, model_dir) -> dict:
    for name, s in scores.items():
        if not torch.isfinite(s).all():
            raise PertaError(f"{model_dir}: {label} importance of {name} is NaN/Inf (does the checkpoint hold NaN weights?)")
    return scores


def _metadata(model, model_dir, forget, retain, method, batch_size, max_length, adapter, t0, **extra) -> dict:
    import transformers

    return {"method": method, "n_forget": str(len(forget)), "n_retain": str(len(retain)),
            "forget_sha256": data_hash(forget), "retain_sha256": data_hash(retain),
            "checkpoint": str(Path(model_dir).resolve()), "checkpoint_sha256": content_sha256(model_dir),
            "batch_size": str(batch_size),
            "max_length": str(max_length), "estimator": "exact per-sample" if method == "fisher" else "mean gradient",
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "adapter": str(Path(adapter).resolve()) if adapter else "",
            "adapter_sha256": content_sha256(adapter) if adapter else "",
            "versions": json.dumps({"perta_fast": __version__, "torch": torch.__version__,
                                    "transformers": transformers.__version__}),
            **{k: str(v) for k, v in extra.items()}, "seconds": f"{time.perf_counter() - t0:.2f}"}


def compute_importance(model_dir: str | Path, forget: list[QA], retain: list[QA], method: str = "grad",
                       batch_size: int = 8, max_length: int = 256, max_samples: int | None = None,
                       device: str | None = None, progress: bool = True, dtype: str | None = None,
                       gradient_checkpointing: bool = False, adapter: str | Path | None = None) -> tuple[dict, dict]:
    """(tensors, metadata) of an importance file, in memory: forget/<name> and retain/<name> scores at
    `model_dir`. For large models use `importance_file`, which streams them to disk and keeps to a budget.

    The model runs in `dtype` (auto: the checkpoint's own); scores accumulate in fp32. With `adapter`
    (a peft LoRA folder for this model) only the weights it targets are scored: τ is 0 everywhere else."""
    t0 = time.perf_counter()
    distributed.setup(device)
    model, tok, forget, retain, names = _load(model_dir, forget, retain, max_samples, device, dtype,
                                              gradient_checkpointing, adapter)
    distributed.agree({"forget": data_hash(forget), "retain": data_hash(retain), "method": method,
                       "batch_size": str(batch_size), "names": str(names)}, "the importance run")
    tensors = {}
    for label, rows in (("forget", forget), ("retain", retain)):
        scores = estimate_importance(model, tok, rows, method, batch_size, max_length, progress,
                                     desc=f"{method} {label}", names=names)
        tensors.update({f"{label}/{n}": s for n, s in _checked(scores, label, model_dir).items()})
    return tensors, _metadata(model, model_dir, forget, retain, method, batch_size, max_length, adapter, t0)


def save_importance(tensors: dict, metadata: dict, out: str | Path, overwrite: bool = False,
                    inputs: tuple = ()) -> Path:
    """Write importance tensors as a safetensors file, streamed tensor by tensor, atomically."""
    with atomic_file(out, overwrite, inputs) as tmp, \
            SafetensorsWriter(tmp, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], metadata) as writer:
        for k, v in tensors.items():
            writer.write(k, v)
    return Path(out)


def parameter_groups(sizes: dict[str, int], budget_bytes: float | None) -> list[list[str]]:
    """Consecutive parameters packed into groups whose fp32 accumulators fit `budget_bytes` each
    (None: one group). One pass over both data sets is made per group."""
    if budget_bytes is None:
        return [list(sizes)]
    groups, current, used = [], [], 0
    for name, numel in sizes.items():
        if current and used + 4 * numel > budget_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += 4 * numel
    return groups + ([current] if current else [])


def _in_use(model) -> int:
    """Memory the process holds now: CUDA allocations on a GPU; on the CPU private memory (RssAnon) plus
    the weights when they are not in it (transformers maps a checkpoint loaded in its own dtype instead of
    copying it: page cache, but resident all the same)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    from .profiling import rss_anon_bytes

    held = rss_anon_bytes()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return held + weights if held < weights else held


HOST_HEADROOM = 1.25  # host memory asked for beyond the offloaded accumulators themselves (runtime, transfers)


def place_accumulators(scored_bytes: int, budget: float | None, device_type: str, host_free: float | None) -> str:
    """Where the fp32 accumulators live under --max-memory: "device" when all of them fit the budget left
    on the device; on a GPU, else "host" when they fit the host's available memory (one pass over the
    data, each parameter's batch contribution moved to the host as it completes: 4 bytes per scored
    parameter per batch over the bus); else "groups" (one pass over the data per parameter group). On the
    CPU the host is the device, so it is device or groups."""
    if budget is None or scored_bytes <= budget:
        return "device"
    if device_type == "cuda" and host_free is not None and HOST_HEADROOM * scored_bytes <= host_free:
        return "host"
    return "groups"


def accumulator_budget(model, model_dir, max_memory_gb: float | None, widest: tuple[int, int], batch_size: int,
                       max_length: int, method: str, checkpointing: bool) -> float | None:
    """Bytes the accumulators of one group may take: the budget less what the process holds now (runtime
    and weights, measured) and the activations and logits a batch will add (perta_fast.plan's formulas)."""
    if max_memory_gb is None:
        return None
    from .plan import Shapes, importance_working_bytes

    b = next(model.parameters()).element_size()
    shapes = Shapes.from_config(model.config.to_dict(), Path(model_dir) / "config.json")
    # the working set is an estimate, measured within 25 % (tests/test_plan.py): keep that much in reserve
    fixed = _in_use(model) + 1.25 * importance_working_bytes(shapes, batch_size, max_length, b, method,
                                                             checkpointing, widest)
    budget = max_memory_gb * 1e9 - fixed
    largest = widest[0] * widest[1]
    if budget < 4 * largest:
        need = (fixed + 4 * largest) / 1e9
        raise PertaError(f"--max-memory {max_memory_gb:g} GB is too small: the model, activations and one "
                         f"parameter's accumulator need at least {need:.2f} GB")
    return budget


class _RunState:
    """An importance run's working folder beside its output (.OUT.resume/): the partly written output,
    the spilled forget scores, and, with checkpoints, the accumulators and where the run stands, so that
    `--resume` continues a killed run. Every file in it is replaced atomically."""

    def __init__(self, out: Path, fingerprint: dict, every: int | None, resume: bool):
        self.dir = resume_dir(out)
        remove_stale_temps(out)
        self.every = every
        self.partial, self.acc_file = self.dir / "partial.safetensors", self.dir / "acc.safetensors"
        if resume:
            self.state = resume_state(self.dir, self.dir / "state.json", fingerprint)
        else:
            if self.dir.exists():  # a killed run's, or one never resumed
                remove_leftover(out, self.dir)
            self.dir.mkdir(parents=True)
            self.state = {"fingerprint": fingerprint, "group": 0, "phase": "forget", "written": 0}
            self.save_state()

    def spill(self, g: int) -> Path:
        return self.dir / f"forget-{g}.safetensors"

    def save_state(self, **changes):
        self.state.update(changes)
        if self.every:
            tmp = self.dir / "state.json.tmp"
            tmp.write_text(json.dumps(self.state))
            os.replace(tmp, self.dir / "state.json")

    def start(self, g: int, phase: str):
        """(accumulators, batches done) saved for this group and phase, if any."""
        if not self.acc_file.is_file():
            return None
        f = SafetensorsFile(self.acc_file)
        if f.metadata.get("group") != str(g) or f.metadata.get("phase") != phase:
            return None
        return {n: f.get(n) for n in f.keys()}, int(f.metadata["batch"])  # mapped: copied in by the estimator

    def on_batch(self, g: int, phase: str):
        if not self.every:
            return None

        def save(done: int, acc: dict):
            if done % self.every:
                return
            save_importance(acc, {"group": str(g), "phase": phase, "batch": str(done)}, self.acc_file,
                            overwrite=True)
            kill_point("checkpoint")
        return save


def importance_file(model_dir: str | Path, forget: list[QA], retain: list[QA], out: str | Path, method: str = "grad",
                    batch_size: int = 8, max_length: int = 256, max_samples: int | None = None,
                    device: str | None = None, overwrite: bool = False, progress: bool = True,
                    dtype: str | None = None, gradient_checkpointing: bool = False, adapter: str | Path | None = None,
                    max_memory: float | None = None, write: str = "scores", weight_dtype: str = "fp16",
                    alpha: float = 1.0, power: float = 1.0, eps: float = 1e-16, group_bytes: int | None = None,
                    checkpoint_every: int | None = None, resume: bool = False, offload: bool | None = None) -> dict:
    """Estimate and write an importance file, streamed: the output is checked before any work is done.

    Accumulators are fp32 and held one parameter group at a time (`max_memory` GB sets the groups; None:
    one group). Each group's forget scores are spilled to a file beside the output before its retain
    pass, so the two sets' scores are never both in memory. `write="weights"` stores the ratio weights
    w = s_f^p / (s_f^p + α·s_r^p + ε) in `weight_dtype` (2 bytes per parameter in fp16) instead of both
    scores (8 bytes). `group_bytes` sets the accumulator bytes per group directly instead.

    With `max_memory` on a GPU whose budget the accumulators do not fit, they are kept in host memory
    instead when the host has room (one pass, `place_accumulators`); `offload` True/False forces that
    choice either way.

    `checkpoint_every` N saves the accumulators and the data position every N batches (atomically, in
    .OUT.resume/ beside the output); `resume` continues from there, refusing a checkpoint made with other
    data, options or model. The resumed file equals an uninterrupted run's (bit-identical on the CPU)."""
    from .ops import ratio

    if write not in ("scores", "weights"):
        raise PertaError(f"--write must be scores or weights, got {write!r}")
    if weight_dtype not in dtypes.NAMES:
        raise PertaError(f"--weight-dtype must be one of {', '.join(dtypes.NAMES)}, got {weight_dtype!r}")
    if max_memory is not None and max_memory <= 0:
        raise PertaError(f"--max-memory must be a positive number of GB, got {max_memory:g}")
    if checkpoint_every is not None and checkpoint_every <= 0:
        raise PertaError(f"--checkpoint-every must be a positive number of batches, got {checkpoint_every}")
    if checkpoint_every or resume:
        distributed.refuse("--checkpoint-every/--resume")
    out = Path(out)
    inputs = (model_dir,) + ((adapter,) if adapter else ())
    check_output_path(out, overwrite, inputs)
    if resume:  # a missing checkpoint fails before the model is loaded; the fingerprint is checked after
        resume_state(resume_dir(out), resume_dir(out) / "state.json", {})
    t0 = time.perf_counter()
    distributed.setup(device)
    main = distributed.is_main()  # under torchrun every rank estimates its share; rank 0 alone writes
    model, tok, forget, retain, names = _load(model_dir, forget, retain, max_samples, device, dtype,
                                              gradient_checkpointing, adapter)
    params = _unique_params(model, names)
    sizes = {n: p.numel() for n, p in params.items()}
    widest = max((tuple(p.shape) for p in params.values() if p.dim() == 2), key=lambda s: s[0] * s[1],
                  default=(max(sizes.values()), 1))
    budget = group_bytes or accumulator_budget(model, model_dir, max_memory, widest, batch_size, max_length, method,
                                               gradient_checkpointing)
    if budget is not None:  # the ranks must make the same groups: the tightest rank's budget for all
        budget = distributed.reduce_float(budget, "min")
    math_device = next(model.parameters()).device
    if offload is None:
        scored_bytes = 4 * sum(sizes.values())
        host_free = None
        if budget is not None and scored_bytes > budget and math_device.type == "cuda":  # the same on every rank
            host_free = distributed.reduce_float(host_available_bytes() or 0, "min")
        offload = place_accumulators(scored_bytes, budget, math_device.type, host_free) == "host"
    groups = parameter_groups(sizes, None if offload else budget)
    if main:
        largest = max(4 * sum(sizes[n] for n in g) for g in groups) / 1e9
        where = f"in host memory, each parameter's batch contribution moved from {math_device} as it " \
            "completes" if offload else f"on {math_device}"
        log.info("importance: fp32 accumulators %s, in %d parameter group(s) of at most %.2f GB, one pass over the "
                 "data per group", where, len(groups), largest)
    if write == "weights":
        layout = [(f"weight/{n}", tuple(p.shape), dtypes.torch_dtype(weight_dtype)) for n, p in params.items()]
    else:
        layout = [(f"{label}/{n}", tuple(p.shape), torch.float32) for n, p in params.items()
                  for label in ("forget", "retain")]
    meta_extra = {"groups": len(groups), "write": write, "ranks": distributed.rank_and_size()[1],
                  "accumulators": "host" if offload else "device"}
    if write == "weights":
        meta_extra.update(alpha=alpha, power=power, eps=eps, weight_dtype=weight_dtype)
    meta = _metadata(model, model_dir, forget, retain, method, batch_size, max_length, adapter, t0, **meta_extra)
    del meta["seconds"]  # the header goes first: the duration is filled in at the end
    fingerprint = {k: meta[k] for k in ("checkpoint_sha256", "forget_sha256", "retain_sha256", "method", "batch_size",
                                        "max_length", "dtype", "adapter_sha256", "write")}
    fingerprint.update(groups=hashlib.sha256(json.dumps(groups).encode()).hexdigest(),
                       merge_knobs=json.dumps([alpha, power, eps, weight_dtype] if write == "weights" else None))
    distributed.agree(fingerprint, "the importance run")
    if not main:
        for group in groups:  # the same passes as rank 0, whose all-reduces they join; nothing is kept
            for rows in (forget, retain):
                estimate_importance(model, tok, rows, method, batch_size, max_length, False, names=group,
                                    offload=offload)
        distributed.barrier()  # return once the file is there
        return {**meta, "seconds": f"{time.perf_counter() - t0:.2f}"}
    run = _RunState(out, fingerprint, checkpoint_every, resume)
    writer = None
    try:
        writer = SafetensorsWriter(run.partial, layout, meta, reserve={"seconds": 16}, done=run.state["written"])
        for g, group in enumerate(groups):
            if g < run.state["group"]:
                continue
            tag = f" [{g + 1}/{len(groups)}]" if len(groups) > 1 else ""
            if run.state["phase"] == "forget":
                scores = estimate_importance(model, tok, forget, method, batch_size, max_length, progress,
                                             f"{method} forget{tag}", group, run.start(g, "forget"),
                                             run.on_batch(g, "forget"), offload)
                save_importance(_checked(scores, "forget", model_dir), {}, run.spill(g), overwrite=True)
                del scores
                run.save_state(phase="retain")
            retain_scores = _checked(estimate_importance(model, tok, retain, method, batch_size, max_length, progress,
                                                         f"{method} retain{tag}", group, run.start(g, "retain"),
                                                         run.on_batch(g, "retain"), offload), "retain", model_dir)
            for n in group:
                # a copy, with the file closed again: a mapping kept open would keep every page of the
                # spill file read so far resident in this process
                s_f, s_r = SafetensorsFile(run.spill(g)).get(n).clone(), retain_scores.pop(n)
                if write == "weights":
                    writer.write(f"weight/{n}", ratio(s_f, s_r, alpha, power, eps, dtypes.torch_dtype(weight_dtype)))
                else:
                    writer.write(f"forget/{n}", s_f)
                    writer.write(f"retain/{n}", s_r)
                del s_f, s_r
            writer.flush()
            run.save_state(group=g + 1, phase="forget", written=writer.written)
            run.spill(g).unlink()
        meta["seconds"] = f"{time.perf_counter() - t0:.2f}"
        writer.close({"seconds": meta["seconds"]})
        os.chmod(run.partial, _umask_mode(0o666))
        publish(run.partial, out)
    except BaseException as e:
        if writer:
            writer.abort()
        if not (checkpoint_every and isinstance(e, (KeyboardInterrupt, OSError))):
            shutil.rmtree(run.dir, ignore_errors=True)  # nothing to resume from: leave nothing behind
        raise
    shutil.rmtree(run.dir, ignore_errors=True)
    distributed.barrier()
    return meta
