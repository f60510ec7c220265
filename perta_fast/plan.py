"""`perta-fast plan`: each step's peak memory, predicted from the model's config alone (nothing loaded).

The formulas, what each term counts and how they are checked: docs/memory.md, their one home. Change a step's
memory here and there together, and rerun `python benchmarks/plan.py`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

from . import dtypes
from .errors import PertaError
from .io import read_json

GB = 1e9
RUNTIME_HOST_BYTES = 0.4e9  # python + torch + transformers + peft, measured on the CPU (benchmarks/plan.py)
LORA_BLOCK_BYTES = 4 * (1 << 22)  # perta_fast.merge.LORA_BLOCK_ELEMENTS of fp32
LOSS_CHUNK_BYTES = 1 << 26  # perta_fast.loss.CHUNK_BYTES: fp32 tokens × vocabulary the loss forms at once
CHUNK_ELEMENTS = 1 << 25  # perta_fast.ops.CHUNK_ELEMENTS: per-sample gradients the torch path forms at once
# perta_fast.scoring's bounds and EvalOptions' default: what `perta-fast eval` holds at once
ANSWER_TOKENS_PER_FORWARD, CONTEXT_TOKENS_PER_FORWARD, GENERATE_BATCH, DECODE_ROOM = 1024, 4096, 128, 64
MAX_NEW_TOKENS = 200
EXACT_MATCH_TOKENS = 32  # perta_fast.calibration.CalibrateOptions' max_new_tokens
POSITIONS_PER_SOFTMAX = 512  # perta_fast.audit's: positions × vocabulary in fp32 at once


def _size(config: dict, *keys, default=None):
    """The first of `keys` the config sets (architectures name the same size differently: GPT-2's n_embd is
    Llama's hidden_size)."""
    for key in keys:
        if config.get(key) is not None:
            return int(config[key])
    if default is None:
        raise KeyError(keys[0])
    return int(default)


@dataclass
class Counted:
    """What the steps touch, counted on the model transformers builds from the config on the meta device (no
    weights, no memory): every parameter of every architecture it can instantiate, MoE experts included."""
    params: int  # unique parameters (a tied output layer once)
    linears: dict[str, tuple[int, int]]  # module name -> (in, out): each Linear or Conv1D but the output layer
    widest: tuple[int, int]  # the largest parameter as (rows, cols): its gradient, its accumulator
    largest_stored: int  # elements of the largest tensor in the checkpoint files (what the merge holds)


def count_parameters(config: dict, path: Path) -> Counted:
    import torch

    from .hf import is_conv1d, meta_model, stored_layout

    model = meta_model(config, path)
    params = dict(model.named_parameters())  # each tied parameter once
    output = model.get_output_embeddings()
    linears = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m is not output:
            linears[name] = (m.in_features, m.out_features)
        elif is_conv1d(m):
            linears[name] = tuple(m.weight.shape)
    widest = max(params.values(), key=lambda p: p.numel())
    stored = [torch.Size(shape).numel() for pieces in stored_layout(model, params).values() for shape in pieces.values()]
    return Counted(sum(p.numel() for p in params.values()), linears,
                   (widest.shape[0], widest.numel() // max(1, widest.shape[0])), max(stored))


@dataclass
class Shapes:
    """A decoder's sizes, for the activation formulas (a Llama-style layer: attention, a gated MLP, two norms),
    and, counted on the real architecture, what each step touches (`counted`)."""
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    dtype: str
    config: dict | None = None  # the config the counts come from (None: Llama's formulas)
    path: Path | None = None

    @classmethod
    def from_config(cls, config: dict, path: Path) -> "Shapes":
        try:
            hidden = _size(config, "hidden_size", "n_embd", "d_model")
            heads = _size(config, "num_attention_heads", "n_head")
            intermediate = _size(config, "moe_intermediate_size", "intermediate_size", "n_inner", "ffn_dim",
                                 default=4 * hidden)
            routed = _size(config, "num_experts_per_tok", default=1)  # a token's experts each keep their MLP's
            shared = _size(config, "shared_expert_intermediate_size", default=0)
            return cls(_size(config, "vocab_size"), hidden, routed * intermediate + shared,
                       _size(config, "num_hidden_layers", "n_layer"), heads,
                       _size(config, "num_key_value_heads", default=heads),
                       _size(config, "head_dim", default=hidden // heads),
                       bool(config.get("tie_word_embeddings", False)),
                       dtypes.CONFIG_NAMES.get(config.get("dtype") or config.get("torch_dtype"), "fp32"), config, path)
        except (KeyError, TypeError, ValueError) as e:
            raise PertaError(f"{path}: config lacks a decoder's sizes ({e})") from None

    @functools.cached_property
    def counted(self) -> Counted | None:
        """None where there is no config, or transformers cannot build it (an architecture this version does
        not know): the Llama formulas count then, and `uncounted` says why."""
        self.uncounted = None
        if self.config is None:
            return None
        try:
            return count_parameters(self.config, self.path)
        except PertaError as e:
            self.uncounted = str(e)
            return None

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each Linear in one decoder layer of Llama's shape."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        d, i = self.hidden, self.intermediate
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}

    @property
    def params(self) -> int:
        if self.counted:
            return self.counted.params
        embed = self.vocab * self.hidden
        norms = (2 * self.layers + 1) * self.hidden
        return self.layers * sum(a * b for a, b in self.linears().values()) + embed * (1 if self.tied else 2) + norms

    def _targeted(self, targets: list[str] | None) -> list[tuple[int, int]]:
        """(in, out) of every Linear a LoRA adapter with these targets (None: all-linear) trains."""
        if self.counted:
            return [shape for name, shape in self.counted.linears.items()
                    if targets is None or name.rsplit(".", 1)[-1] in targets]
        return [shape for n, shape in self.linears().items() if targets is None or n in targets] * self.layers

    def lora_params(self, rank: int, targets: list[str] | None) -> int:
        return sum(rank * (a + b) for a, b in self._targeted(targets))

    def targeted_params(self, targets: list[str] | None) -> int:
        return sum(a * b for a, b in self._targeted(targets))

    def widest(self, targets: list[str] | None = None, lora: bool = False) -> tuple[int, int]:
        """(rows, cols) of the largest tensor importance scores: with LoRA the largest targeted Linear."""
        if lora:
            return max(((o, i) for i, o in self._targeted(targets)), key=lambda rc: rc[0] * rc[1])
        if self.counted:
            return self.counted.widest
        return max([(o, i) for i, o in self.linears().values()] + [(self.vocab, self.hidden)],
                   key=lambda rc: rc[0] * rc[1])

    def largest_stored(self, targets: list[str] | None = None, lora: bool = False) -> int:
        """Elements of the largest tensor the merge computes (with LoRA, only targeted ones change)."""
        if lora or not self.counted:
            rows, cols = self.widest(targets, lora)
            return rows * cols
        return self.counted.largest_stored

    def saved_per_token_layer(self) -> int:
        """Elements kept per token for one decoder layer's backward: each RMSNorm's input and output,
        q, k, v, the attention output and o_proj's input, and the gated MLP's gate, act(gate), up and
        their product. The same whether the weights train (autograd keeps the Linears' inputs) or are
        frozen under the exact Fisher (its hooks keep them)."""
        d, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * (2 * d) + (3 * q + 2 * kv) + 4 * i

    def lora_inputs_per_token_layer(self, targets: list[str] | None) -> int:
        """peft runs an fp32 adapter on an fp32 copy of each targeted Linear's input."""
        return sum(a for n, (a, _) in self.linears().items() if targets is None or n in targets)


def logits_bytes(s: Shapes, tokens: int, b: int, backward: bool) -> int:
    """The loss's working set: the logits the model returns, in its dtype, and (training) their gradient in
    the same dtype; perta_fast.loss forms fp32 only one chunk of tokens at a time, never the whole batch's."""
    chunk = 4 * s.vocab * min(tokens, max(1, LOSS_CHUNK_BYTES // (4 * s.vocab)))
    return tokens * s.vocab * b * (2 if backward else 1) + chunk


def activations(s: Shapes, tokens: int, b: int, checkpointing: bool, lora_targets=False) -> int:
    """Saved activations of all layers; `lora_targets` (a list, or None for all-linear) adds peft's fp32
    input copies when the model is not fp32."""
    per_token = s.saved_per_token_layer() * b
    if lora_targets is not False and b < 4:
        per_token += 4 * s.lora_inputs_per_token_layer(lora_targets)
    if checkpointing:
        return s.layers * tokens * s.hidden * b + per_token * tokens
    return s.layers * per_token * tokens


def importance_working_bytes(s: Shapes, batch_size: int, max_length: int, b: int, method: str,
                             checkpointing: bool, widest_scored: tuple[int, int]) -> int:
    """What an importance pass adds besides weights and accumulators: activations, the loss's logits and,
    for the exact Fisher, the torch path's chunk of per-sample gradients (at most CHUNK_ELEMENTS fp32
    values, rows tiled however wide the layer: perta_fast.ops.per_sample_tiles); for the mean gradient,
    the widest scored parameter's gradient in the model dtype as autograd forms it, beside the activations.
    A tied embedding's gradient is the exception: autograd keeps the output layer's part until the lookup's
    arrives at the end of the backward, when the activations are gone, and then holds both and their sum.
    The peak is the larger of the two moments (measured on a tied Llama: 3 copies at 1 layer and batch 1,
    where the end is the larger, 1 at 8 layers and batch 8; counting 3 beside the activations was 1.21)."""
    tokens = batch_size * max_length
    working = activations(s, tokens, b, checkpointing) + logits_bytes(s, tokens, b, True)
    if method == "grad":
        gradient = b * widest_scored[0] * widest_scored[1]
        tied_widest = s.tied and widest_scored[0] * widest_scored[1] >= s.vocab * s.hidden
        working = max(working + gradient, 3 * gradient if tied_widest else 0)
    if method == "fisher":  # the chunk perta_fast.ops.per_sample_tiles picks for the widest (rows, cols)
        n_rows, n_cols = widest_scored
        rows = min(n_rows, max(1, CHUNK_ELEMENTS // n_cols))
        working += 4 * rows * n_cols * max(1, min(batch_size, CHUNK_ELEMENTS // (rows * n_cols)))
    return working


def tofu_eval_bytes(s: Shapes, b: int, context: int, batch: int = GENERATE_BATCH,
                    max_new_tokens: int = MAX_NEW_TOKENS, device: str = "cpu") -> int:
    """`perta-fast eval`'s peak above the weights, the larger of its phases (the module docstring), with
    `context` tokens of prompt and agreed answer a question (a continuation's cache)."""
    kv = kv_bytes_per_token(s, b)
    logits = ANSWER_TOKENS_PER_FORWARD * s.vocab
    waiting = (batch - 1) * context * kv if max_new_tokens else 0  # scored, not yet a full batch to decode
    # that fp32 result is gone before the log-sum-exp forms its fp32 chunk
    fp32_scratch = 4 * logits if cpu_matmul_writes_fp32(b, device) else min(LOSS_CHUNK_BYTES, 4 * logits)
    scoring = logits * b + fp32_scratch + CONTEXT_TOKENS_PER_FORWARD * (kv + context * b) + waiting
    if not max_new_tokens:
        return scoring
    return max(scoring, decoding_bytes(s, b, context, batch, max_new_tokens, device))


def audit_bytes(s: Shapes, b: int, batch: int, length: int, widest_scored: tuple[int, int]) -> tuple[int, int]:
    """`perta-fast audit`'s peak above the weights in each of its two phases. Token attacks: a no-grad
    forward's logits in the model dtype and, for one row's positions at a time, log p, p and the two
    temporaries of the two-pass variance in fp32 (four copies). GradNorm: the exact Fisher's backward
    (importance_working_bytes) without its accumulator, plus its Gram trick's three samples × tokens × tokens
    fp32 products."""
    tokens = batch * length
    scoring = tokens * s.vocab * b + 4 * 4 * min(length, POSITIONS_PER_SOFTMAX) * s.vocab
    gradnorm = (importance_working_bytes(s, batch, length, b, "fisher", False, widest_scored)
                + 3 * 4 * batch * length * length)
    return scoring, gradnorm


def cpu_matmul_writes_fp32(b: int, device: str) -> bool:
    """A CPU matmul in bf16/fp16 writes an fp32 result, then casts it (measured: a 1024 x 49152 bf16 linear
    holds 301 MB, its output 101 MB): logits cost 4 more bytes an entry while they are formed."""
    return device == "cpu" and b < 4


def kv_bytes_per_token(s: Shapes, b: int) -> int:
    return 2 * s.layers * s.kv_heads * s.head_dim * b


def decoding_bytes(s: Shapes, b: int, context: int, batch: int, max_new_tokens: int, device: str = "cpu") -> int:
    """Greedy decoding of `batch` rows that each start from `context` tokens of cache (perta_fast.scoring):
    the larger of the cache they are copied from beside the roomy cache they are copied into, and that
    cache filled, doubling up to context + max_new_tokens; plus a decode step's logits. On the CPU a fresh
    buffer holds only the pages written, so while the rows are copied in the room beyond them is not yet
    memory (tests/test_plan.py's exact-match case: 0.985 of the held peak; with the room counted, 1.26)."""
    kv = kv_bytes_per_token(s, b)
    most = context + max_new_tokens  # tokens a row's decode cache can reach
    size = context + min(DECODE_ROOM, max_new_tokens)  # tokens the decode cache first holds a row
    copied = context + (context if device == "cpu" else size)
    tokens = max(copied, size, doubling_peak_tokens(size, most, most, s.layers))
    logits = batch * s.vocab * (b + (4 if cpu_matmul_writes_fp32(b, device) else 0))
    return int(batch * kv * tokens) + logits


def doubling_peak_tokens(size: int, until: int, most: int, layers: int) -> float:
    """A row's most tokens in the decode cache while it doubles from `size` tokens until it holds `until`
    (never past `most`): at each doubling, a layer at a time, the grown buffers plus one layer of the old."""
    peak = 0.0
    while size < until:
        grown = min(2 * size + 1, most)
        peak, size = max(peak, grown + size / layers), grown
    return peak


def _batch_that_fits(bytes_at, batch: int, room: float | None, command: str) -> str:
    """Where a decoding step does not fit `room` bytes, the most questions decoded together that do (the
    decode cache is what grows with them), as a hint: `bytes_at(n)` is the step's bytes at n questions."""
    if room is None or bytes_at(batch) <= room:
        return ""
    fits = next((n for n in range(batch - 1, 0, -1) if bytes_at(n) <= room), None)
    return f"; {command} --batch-size {fits} fits" if fits else ""


def plan_steps(config_path: str | Path, lora_rank: int | None = None, lora_targets: str = "all-linear",
               dtype: str = "auto", method: str = "fisher", batch_size: int = 8, max_length: int = 256,
               checkpointing: bool = False, groups: int = 1, memory_gb: float | None = None,
               device: str = "cpu", eval_batch: int = GENERATE_BATCH, max_new_tokens: int = MAX_NEW_TOKENS,
               calibrate_batch: int = GENERATE_BATCH, exact_match: bool = True, prompt_length: int | None = None,
               bf16_autocast: bool = False) -> dict:
    """{"steps": {step: (bytes, formula)}, ...}: each step's peak memory, without the runtime's own.
    With `memory_gb`, importance is split into as many parameter groups as that budget needs
    (`importance --max-memory`), and "groups" says how many. `eval_batch` and `max_new_tokens` are
    `perta-fast eval`'s --batch-size and --max-new-tokens; `calibrate_batch` and `exact_match` calibrate's
    --batch-size and whether it decodes (CalibrateOptions.generate), from prompts of `prompt_length` tokens
    (default `max_length`, which bounds them). `bf16_autocast` (fine-tuning's, eval's and calibrate's
    --bf16-autocast over fp32 weights): autocast keeps a bf16 copy of every weight that requires grad until
    its context exits (its cast cache), 2·P more in the full fine-tune and every scoring step."""
    config_path = Path(config_path)
    if config_path.is_dir():
        config_path = config_path / "config.json"
    s = Shapes.from_config(read_json(config_path), config_path)
    dt = s.dtype if dtype == "auto" else dtype
    if dt not in dtypes.BYTES:
        raise PertaError(f"unknown --dtype {dtype!r} (expected auto, {', '.join(dtypes.NAMES)})")
    b, P = dtypes.BYTES[dt], s.params
    targets = None if lora_targets == "all-linear" else [t.strip() for t in lora_targets.split(",")]
    tokens = batch_size * max_length
    weights = b * P
    loss = logits_bytes(s, tokens, b, True)
    casts = 2 * P if bf16_autocast and dt == "fp32" else 0  # autocast's cast cache (nothing to cast otherwise)
    cast_note = " + bf16 weight copies 2·P (autocast)" if casts else ""
    backward = activations(s, tokens, b, checkpointing) + loss
    if b < 4:  # fp32 master weights (perta_fast.train.MasterWeights): AdamW steps those, and its moments are fp32
        full = (max((2 * b + 12) * P + backward, (b + 16) * P),
                f"weights, grads {2 * b}·P + fp32 master weights and AdamW moments 12·P + activations + logits, "
                f"or at the step {b}·P + 16·P (the masters' fp32 gradients)")
    else:
        full = (4 * weights + backward + casts, f"weights, grads, AdamW moments {4 * b}·P + activations + logits"
                + cast_note)
    steps = {"finetune (full)": full}
    scored = P
    if lora_rank:
        adapter = 16 * s.lora_params(lora_rank, targets)
        steps["finetune (LoRA)"] = (weights + adapter + activations(s, tokens, b, checkpointing, targets) + loss,
                                    f"weights {b}·P + adapter 16·P_lora + activations + logits")
        scored = s.targeted_params(targets)
    # the largest tensor importance scores and the merge computes: with LoRA only the targeted Linears
    widest_shape = s.widest(targets, bool(lora_rank))
    widest = s.largest_stored(targets, bool(lora_rank))
    working = weights + importance_working_bytes(s, batch_size, max_length, b, method, checkpointing,
                                                 widest_shape)
    if memory_gb is not None:  # as many groups as the budget needs, as importance --max-memory chooses
        room = memory_gb * GB - RUNTIME_HOST_BYTES - working
        groups = math.ceil(4 * scored / room) if room >= 4 * widest else 1
    steps[f"importance ({method})"] = (working + 4 * math.ceil(scored / max(1, groups)),
                                       f"weights {b}·P + activations + logits + fp32 accumulator 4·P_t"
                                       + (f" in {groups} groups (--max-memory)" if groups > 1 else "")
                                       + (" + per-sample chunk" if method == "fisher" else ""))
    if device == "cuda" and groups > 1:  # what importance picks instead of groups when the host has room
        steps[f"importance ({method}, host)"] = (
            working + 4 * widest, f"weights + activations + logits + one parameter's fp32 buffer on the GPU; "
                                  f"{4 * scored / GB:.1f} GB fp32 accumulators in host memory, one pass")
    if device == "cuda":  # the output buffer, and each input copied to the GPU (fp32 scores or a LoRA block)
        steps["merge"] = ((2 * b + 8) * widest + LORA_BLOCK_BYTES, "output + inputs of the largest tensor on the GPU")
    else:  # inputs are read from the mapped files; only the output buffer is held
        steps["merge"] = (b * widest + LORA_BLOCK_BYTES, "output buffer of the largest tensor + a LoRA block")
    # scoring under autocast: the fp32 figures bound its activations, and its weight copies come on top
    weights += casts
    room = None if memory_gb is None else memory_gb * GB - RUNTIME_HOST_BYTES - weights
    scoring = tofu_eval_bytes(s, b, max_length, max_new_tokens=0, device=device)
    steps["quick eval"] = (weights + scoring, f"weights {b}·P{cast_note} + a scoring forward (answer probabilities)")
    steps["eval (TOFU)"] = (weights + tofu_eval_bytes(s, b, max_length, eval_batch, max_new_tokens, device),
                            f"weights {b}·P{cast_note} + scoring or decoding ({eval_batch} questions, {max_new_tokens} new tokens)"
                            + _batch_that_fits(lambda n: tofu_eval_bytes(s, b, max_length, n, max_new_tokens, device),
                                               eval_batch, room, "eval"))
    token_attacks, gradnorm = audit_bytes(s, b, batch_size, max_length, widest_shape)
    steps["audit"] = (weights + max(token_attacks, gradnorm),
                      f"weights {b}·P{cast_note} + the larger of a scoring forward's logits (token attacks) and the "
                      f"exact Fisher's backward (gradnorm), {batch_size} samples; without gradnorm "
                      f"{(weights + token_attacks) / GB:.2f} GB; --reference adds {b}·P")
    # calibrate (and unlearn --lam auto): one model moved over λ in place, scored and decoded at each point
    def calibrate_bytes(questions: int) -> int:
        decoding = decoding_bytes(s, b, prompt_length or max_length, questions, EXACT_MATCH_TOKENS, device)
        return max(scoring, decoding if exact_match else 0) + steps["merge"][0]

    steps["calibrate"] = (weights + calibrate_bytes(calibrate_batch),
                          f"quick eval or exact-match decoding ({calibrate_batch} questions, {EXACT_MATCH_TOKENS} new "
                          f"tokens) + the merge's buffers{cast_note}" + _batch_that_fits(calibrate_bytes, calibrate_batch, room,
                                                                              "calibrate")
                          if exact_match else f"quick eval + the merge's buffers (no exact match){cast_note}")
    steps = {k: (int(v), d) for k, (v, d) in steps.items()}
    return {"shapes": s, "dtype": dt, "params": P, "steps": steps, "groups": groups}


def format_plan(result: dict, memory_gb: float | None, device: str) -> str:
    s: Shapes = result["shapes"]
    head = (f"{result['params'] / 1e9:.2f} B parameters ({s.layers} layers, hidden {s.hidden}, vocab {s.vocab}), "
            f"{result['dtype']}; memory on {device}")
    lines = [head]
    if s.counted is None and getattr(s, "uncounted", None):
        lines.append(f"  (parameters counted by Llama's formulas: {s.uncounted})")
    for step, (nbytes, detail) in result["steps"].items():
        verdict = ""
        if memory_gb is not None:
            verdict = "fits" if nbytes + RUNTIME_HOST_BYTES <= memory_gb * GB else "does not fit"
        lines.append(f"  {step:<25} {nbytes / GB:7.2f} GB  {verdict:<12}  {detail}")
    lines.append(f"  (each + the runtime: ~{RUNTIME_HOST_BYTES / GB:.1f} GB of host memory"
                 + ("; on the GPU the CUDA context, outside these figures)" if device == "cuda" else ")"))
    return "\n".join(lines)


def data_counts(model_folder: str | Path, sets: dict[str, list], max_length: int, batch_size: int) -> dict:
    """Per set what fine-tuning and importance take in, cut as they cut it with the model's tokenizer: its rows'
    shape, samples (a text's windows of `max_length` tokens), scored tokens, and batches per pass."""
    from .data import encode, set_summary, source_of
    from .models import load_tokenizer

    tokenizer = load_tokenizer(Path(model_folder) if Path(model_folder).is_dir() else Path(model_folder).parent)
    counts = {}
    for name, rows in sets.items():
        encoded = encode(tokenizer, rows, max_length, source_of(rows, f"the {name} set"))
        counts[name] = {**set_summary(rows, encoded), "batches": math.ceil(len(encoded) / batch_size)}
    return counts


def format_counts(counts: dict, max_length: int, batch_size: int) -> str:
    lines = [f"data (samples of at most {max_length} tokens, batches of {batch_size}):"]
    for name, c in counts.items():
        lines.append(f"  {name:<7} {c['format']:<16} rows {c['rows']:>7,}  samples {c['samples']:>7,}  "
                     f"scored tokens {c['scored_tokens']:>10,}  batches a pass {c['batches']:>6,}")
    return "\n".join(lines)
