"""The estimators: per-parameter scores of a model on rows, |mean gradient| ("grad") or the exact diagonal
empirical Fisher ("fisher": mean over samples of the squared per-sample gradient).

The exact Fisher never materialises a per-sample gradient of the whole model. Hooks capture each
layer's input X and output gradient G during one batched backward; a Linear's per-sample gradient
is G_bᵀX_b, a norm's is Σ_t G⊙x̂, an embedding's is an index_add of G over the sample's tokens.
All weights are frozen so autograd skips their (batched) weight gradients entirely.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .. import distributed
from ..console import bar
from ..data import QA, collate, encode, logits_of, pad_id
from ..errors import PertaError
from ..hf import embedding_scale, is_conv1d, is_rms_norm, known_embedding, rms_eps
from ..loss import per_sample_loss
from ..memory import release_freed_memory
from ..ops import accumulate_, add_squares_, linear_fisher_, per_sample_tiles

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


def _accumulators(params: dict, offload: bool) -> dict[str, torch.Tensor]:
    """fp32 zeros beside each parameter, or all in host memory when offloaded (not pinned: the transfers
    land in temporaries, and tens of GB of page-locked memory is what a host can least spare)."""
    return {n: torch.zeros(p.shape, dtype=torch.float32, device="cpu" if offload else p.device)
            for n, p in params.items()}


def _fisher_modules(model, scored: dict):
    """(module, kind) for each module the exact Fisher hooks: "linear" (Linear, Conv1D), "norm" (RMSNorm,
    LayerNorm) when they hold a scored parameter, and every "embedding" (with frozen weights, backward
    starts there). `scored`: ids of the scored parameters."""
    wanted = lambda *ps: any(id(p) in scored for p in ps if isinstance(p, nn.Parameter))  # noqa: E731
    for m in model.modules():
        if (isinstance(m, nn.Linear) or is_conv1d(m)) and wanted(m.weight, m.bias):
            yield m, "linear"
        elif isinstance(m, nn.Embedding):
            yield m, "embedding"
        elif (is_rms_norm(m) or isinstance(m, nn.LayerNorm)) and wanted(m.weight, getattr(m, "bias", None)):
            yield m, "norm"


def fisher_blocker(model, names=None) -> str | None:
    """Why the exact Fisher cannot score `model`'s parameters (`names`, None: all), or None: from its modules
    alone, so it is asked before any work (on a model built on the meta device, too). Names the parameter,
    the model type and the alternative."""
    params = _unique_params(model, names)
    name_of = {id(p): n for n, p in params.items()}
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    covered = set()
    for m, what in _fisher_modules(model, name_of):
        if what == "embedding" and id(m.weight) in name_of and not known_embedding(m):
            return (f"exact fisher: {name_of[id(m.weight)]} is a {type(m).__name__}, whose forward does more than "
                    f"a lookup: its per-sample gradient is not formed here ({kind}); use --method grad")
        covered.update(id(p) for p in m.parameters(recurse=False))
    missing = [n for n, p in params.items() if id(p) not in covered]
    if not missing:
        return None
    owner = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    module = type(owner[id(params[missing[0]])]).__name__
    if any(word in module for word in ("Expert", "Router", "Moe", "MoE")):
        why = (f"{kind} routes each token to some of its experts, and its {module} (a router or fused experts) "
               "sees the tokens of many samples at once: per-sample squares are not formed there")
    else:
        why = f"its {module} is none of the layers whose per-sample gradient is formed here (Linear, Conv1D, " \
              "Embedding, RMSNorm, LayerNorm)"
    return (f"exact fisher does not support parameter {missing[0]} ({len(missing)} unsupported): {why}; "
            "use --method grad")


class _ExactFisher:
    """Accumulates Σ_b g_b² for every parameter of `model` from hook-captured X and G."""

    def __init__(self, model: nn.Module, names=None, offload: bool = False):
        blocker = fisher_blocker(model, names)  # before any memory is taken or hook placed
        if blocker:
            raise PertaError(blocker)
        self.model = model
        params = _unique_params(model, names)
        self.name_of = {id(p): n for n, p in params.items()}
        self.acc = self._sinks(params, offload)
        self.offload = offload
        self.tied_linear: dict[int, tuple] = {}  # weight id -> (X, G) of a Linear sharing an embedding's weight
        self.embedded: dict[int, tuple] = {}  # weight id -> (ids, G) of that embedding
        self.halves: dict[int, dict] = {}  # module id -> X or G, whichever came first (gradient checkpointing)
        self.awaiting: set[int] = set()  # checkpointed modules whose X and G are still to meet this step
        self.checkpointed = _checkpointed_modules(model)
        self.mask = None
        self.called: set = set()
        self.handles = []
        emb_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        self.embed_scale = {}  # embedding weight id -> what its forward scales the lookup by
        for m, kind in _fisher_modules(model, self.name_of):
            if kind == "linear":
                handle = self._tied_linear if id(m.weight) in emb_weights else self._linear_grads
                self.handles.append(m.register_forward_hook(self._hook(handle)))
            elif kind == "embedding":
                self.handles.append(m.register_forward_hook(self._embedding_hook))
                self.embed_scale[id(m.weight)] = embedding_scale(m)
            else:
                self.handles.append(m.register_forward_hook(self._hook(self._norm_grads)))
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

    def _sinks(self, params: dict, offload: bool) -> dict[str, torch.Tensor]:
        return _accumulators(params, offload)

    def _add_per_sample(self, param, per_sample: torch.Tensor):
        """A parameter's per-sample gradients (samples first), added as their squares summed over samples."""
        self._add(param, per_sample.square().sum(0))

    def _add_rows(self, param, sample: int, rows: torch.Tensor, per_row: torch.Tensor):
        """One sample's gradient of the embedding rows it touches."""
        acc = self.acc[self.name_of[id(param)]]
        acc.index_add_(0, rows.to(acc.device), per_row.square().to(acc.device))

    def _add_tile(self, param, acc, v0: int, v1: int, first: int, per_sample: torch.Tensor):
        """Per-sample gradients of vocabulary rows v0:v1 of a tied embedding, samples first:first + len."""
        add_squares_(acc[v0:v1], per_sample)

    def _linear_weight(self, module, x, g):
        with self._into(module.weight) as acc:
            # a Conv1D (GPT-2) stores the transpose of a Linear's weight, (in, out): its per-sample
            # gradient x_bᵀg_b is the Linear formula with the two operands' roles swapped
            linear_fisher_(acc, g, x) if is_conv1d(module) else linear_fisher_(acc, x, g)

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
            self._linear_weight(module, x, g)
        if module.bias is not None:
            b = x.shape[0]
            self._add_per_sample(module.bias, g.reshape(b, -1, g.shape[-1]).float().sum(1))

    def _embedding_hook(self, module, inputs, output):
        if _in_backward():  # an embedding inside a recomputed layer: its gradient comes from the first pass
            return output
        self._once(module)
        ids = inputs[0]
        output.requires_grad_(True)  # weights are frozen: this is where the backward pass starts
        batch = self.mask.shape[0]
        if ids.shape[0] == 1 and batch > 1:
            # positions shared by the batch (GPT-2's wpe): one row of lookups broadcast over the samples, whose
            # gradient arrives summed over them. Expanded here, each sample's part arrives apart.
            ids = ids.expand(batch, *ids.shape[1:])
            output = output.expand(batch, *output.shape[1:])

        def on_grad(g):
            self.embedded[id(module.weight)] = (module, ids, g.detach())
        output.register_hook(on_grad)
        return output

    def _norm_grads(self, module, x, g):
        xf = x.float()
        if isinstance(module, nn.LayerNorm):
            x_hat = F.layer_norm(xf, module.normalized_shape, eps=module.eps)
        else:
            x_hat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + rms_eps(module))
        x_hat = x_hat.to(x.dtype).float()  # as the module rounds it before scaling by the weight
        gf = g.float().reshape(g.shape[0], -1, g.shape[-1])
        x_hat = x_hat.reshape(gf.shape)
        self._add_per_sample(module.weight, (gf * x_hat).sum(1))
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            self._add_per_sample(module.bias, gf.sum(1))

    def _embedding_grads(self):
        """Embeddings (and tied output layers) once the whole backward has run."""
        for wid, (module, ids, g_emb) in self.embedded.items():
            if wid not in self.name_of:
                continue
            keep = self.mask.bool()  # padding positions never count, and autograd gives the
            if module.padding_idx is not None:  # padding_idx row no embedding gradient at all
                keep = keep & (ids != module.padding_idx)
            mask = keep.to(g_emb.dtype).unsqueeze(-1)
            # a scaled embedding (Gemma) multiplies the looked-up row: the row's gradient carries the factor too
            g_emb = (g_emb.float() * mask * self.embed_scale[wid]).reshape(ids.shape[0], -1, g_emb.shape[-1])
            ids = ids.reshape(ids.shape[0], -1)
            lin = self.tied_linear.pop(wid, None)
            vocab, dim = module.weight.shape
            if lin is None:  # a sample touches few rows: square per-row sums of that sample only
                for b in range(ids.shape[0]):
                    rows, inverse = torch.unique(ids[b], return_inverse=True)
                    per_row = torch.zeros(len(rows), dim, device=g_emb.device).index_add_(0, inverse, g_emb[b])
                    self._add_rows(module.weight, b, rows, per_row)
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
                        self._add_tile(module.weight, acc, v0, v1, s, per_sample)
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


class _PerSampleSquares(_ExactFisher):
    """Each sample's squared gradient norm per parameter, (samples, parameters) for a batch: the exact Fisher's
    hooks with the squares summed over each parameter's elements instead of over the samples (the audit's
    GradNorm attack), from one batched backward. A Linear's ‖G_bᵀX_b‖² is Σ_ts (X_bX_bᵀ)_ts (G_bG_bᵀ)_ts: two
    tokens × tokens products per sample instead of an out × in gradient."""

    def _sinks(self, params: dict, offload: bool) -> dict:
        self.slot = {n: i for i, n in enumerate(params)}
        self.squares = None
        return {}

    def _total(self, param, first: int, values: torch.Tensor):
        if id(param) in self.name_of:
            column = self.squares[:, self.slot[self.name_of[id(param)]]]
            column[first:first + len(values)] += values.to(self.squares.device)

    @contextlib.contextmanager
    def _into(self, param):
        yield None

    def _add_per_sample(self, param, per_sample: torch.Tensor):
        self._total(param, 0, per_sample.square().flatten(1).sum(1))

    def _add_rows(self, param, sample: int, rows: torch.Tensor, per_row: torch.Tensor):
        self._total(param, sample, per_row.square().sum().reshape(1))

    def _add_tile(self, param, acc, v0: int, v1: int, first: int, per_sample: torch.Tensor):
        self._total(param, first, per_sample.square().sum((1, 2)))

    def _linear_weight(self, module, x, g):
        b = x.shape[0]
        x, g = x.reshape(b, -1, x.shape[-1]).float(), g.reshape(b, -1, g.shape[-1]).float()
        self._total(module.weight, 0, (torch.bmm(x, x.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2)))

    def squares_of(self, ids, mask, labels) -> torch.Tensor:
        """(samples, parameters): Σ over each parameter's elements of each sample's squared loss gradient."""
        self.squares = torch.zeros(ids.shape[0], len(self.slot), dtype=torch.float32)
        self.step(ids, mask, labels)
        return self.squares


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


def estimate_importance(model, tokenizer, rows: list[QA], method: str, *, batch_size: int = 8,
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
