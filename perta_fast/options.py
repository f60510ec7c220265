"""Every command's options, each default written once. The library's functions take these dataclasses, and
`perta_fast.cli` generates each command's flags from their fields (name, default, help and the CLI details
in the field's metadata), so a new option is one edit here.

A leaf: dataclasses only, nothing heavier, so `perta-fast --help` and the merge path stay light.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from .errors import PertaError

DTYPE_NAMES = ("bf16", "fp16", "fp32")  # --dtype and --weight-dtype (perta_fast.dtypes.NAMES)
DTYPE_CHOICES = ("auto",) + DTYPE_NAMES
DEFAULT_LAMS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
# Questions decoded together. A decode step's cost is mostly fixed (every weight is read once): ~120 ms + ~4.4 ms
# per row for SmolLM2-135M on a 2-core CPU, measured; the TOFU benchmark's 160 questions evaluate 1.22x faster
# at 128 than at 64 (fewer batches, each as many steps as its longest answer). Memory: the batch's cache.
GENERATE_BATCH = 128


def opt(default=None, help: str | None = None, *, factory=None, **cli):
    """A field with its CLI description. `cli` keys: flag (default --field-name), type, choices, metavar,
    nargs, negate (a True default switched off by this flag), to_field (turns the flag's value into the
    field's), flag_default (the flag's default, where it is written in other units), hidden (no flag)."""
    meta = {"help": help, **cli}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


def positive(text: str) -> int:
    """A flag's type: an integer ≥ 1 (0 epochs or a batch of 0 would fail later, with a traceback)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def lam_value(text: str) -> float | str:
    """unlearn's --lam: a number, or auto."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


DEVICE_HELP = "cpu, cuda, ... (default: cuda if available)"
DTYPE_HELP = "load the model straight into this dtype (auto: the checkpoint's own)"
CKPT_HELP = "recompute each layer in backward instead of keeping its activations"
BF16_HELP = "score with bf16 matmuls over the loaded weights: faster where bf16 is native (a GPU, AVX-512 BF16 or " \
    "AMX), not fp32's numbers; greedy decoding stays fp32 (autocast slows it)"
ALPHA_HELP = "α: weight of retain importance"
POWER_HELP = "p: w = s_f^p / (s_f^p + α s_r^p + ε)"
EPS_HELP = "ε, which keeps w defined where both scores are 0"
HOLD_OUT_HELP = "hold back this fraction of each set (spread over it) for validating λ: never used for importance"


def _dtype(help=DTYPE_HELP):
    return opt("auto", help, choices=DTYPE_CHOICES)


@dataclass(kw_only=True)
class TrainingOptions:
    """What the one training loop (train.train_in_place) reads: fine-tuning's and the baselines' common part."""
    epochs: int = opt(3, "passes over the rows", type=positive)
    lr: float = opt(1e-4, "AdamW's learning rate")
    batch_size: int = opt(8, "rows per optimizer step", type=positive)
    max_length: int = opt(256, "tokens per sample (prompt + answer)", type=positive)
    seed: int = opt(0, "data order and initialisation (LoRA)")
    weight_decay: float = opt(0.0, "AdamW's (TOFU's recipe: 0.01)")
    warmup_epochs: int = opt(0, "linear learning-rate warm-up (TOFU's recipe: 1)")
    device: str | None = opt(None, DEVICE_HELP)
    bf16_autocast: bool = opt(False, "mixed precision: bf16 matmuls, fp32 weights and optimizer state")
    dtype: str = _dtype("weights' dtype while training (auto: the checkpoint's own)")
    gradient_checkpointing: bool = opt(False, CKPT_HELP)


@dataclass(kw_only=True)
class FinetuneOptions(TrainingOptions):
    lora_rank: int | None = opt(None, "train θ_ft as a LoRA adapter of this rank (peft)")
    lora_alpha: float | None = opt(None, "LoRA α (default 2·rank)")
    lora_targets: str = opt("all-linear", "all-linear, or module names: q_proj,v_proj,…")
    save_dtype: str = _dtype("the written checkpoint's dtype (auto: fp32 where training kept fp32 master weights "
                             "of bf16/fp16 ones, so τ loses nothing; else the weights' own)")


@dataclass(kw_only=True)
class BaselineOptions(TrainingOptions):
    """GA or NPO (perta_fast.baselines): TOFU's recipe (weight decay 0.01, one warm-up epoch)."""
    method: str = opt("npo", "ga: gradient ascent on the forget loss; npo: negative preference optimization",
                      choices=("ga", "npo"))
    epochs: int = opt(5, "passes over the forget rows", type=positive)
    lr: float = opt(1e-5, "AdamW's learning rate")
    weight_decay: float = opt(0.01, "AdamW's (TOFU's recipe: 0.01)")
    warmup_epochs: int = opt(1, "linear learning-rate warm-up (TOFU's recipe: 1)")
    beta: float = opt(0.1, "NPO's β (inverse temperature)")
    retain_weight: float = opt(1.0, "NPO's retain-loss weight (GA uses none)")


@dataclass(kw_only=True)
class MergeOptions:
    method: str = opt("perta", "perta: w from the importance file; tv: w ≡ 1", choices=("perta", "tv"))
    lam: float = opt(1.0, "λ: how far to step against the task vector")
    alpha: float = opt(1.0, ALPHA_HELP)
    power: float = opt(1.0, POWER_HELP)
    eps: float = opt(1e-16, EPS_HELP)
    nan_to_zero: bool = opt(False, "treat NaN/Inf in inputs as 0 instead of failing")
    max_shard_bytes: int = opt(2 * 1024**3, "GiB per output shard", flag="--max-shard-size", type=float, metavar="GiB",
                               flag_default=2.0, to_field=lambda gib: int(gib * 1024**3))
    device: str = opt("cpu", "where the math runs: cpu or cuda (files stay on the host)")


MERGE_KNOBS = ("alpha", "power", "eps")  # the ratio's knobs, which importance --write weights and calibrate take too


@dataclass(kw_only=True)
class ImportanceOptions:
    method: str = opt("grad", "grad: |mean gradient|; fisher: the exact diagonal empirical Fisher",
                      choices=("grad", "fisher"))
    batch_size: int = opt(8, "rows per forward and backward", type=positive)
    max_length: int = opt(256, "tokens per sample (prompt + answer)", type=positive)
    max_samples: int | None = opt(None, "use the first N rows of each set", type=positive)
    device: str | None = opt(None, DEVICE_HELP)
    dtype: str = _dtype()
    gradient_checkpointing: bool = opt(False, CKPT_HELP)
    adapter: str | None = opt(None, "a LoRA adapter folder (θ_ft): score only the weights it targets")
    max_memory: float | None = opt(
        None, "keep peak memory (GPU memory on a GPU, private host memory on the CPU) under this budget: fp32 "
        "accumulators on the device if they fit, else (GPU) in host memory if it has room, else in parameter groups, "
        "one pass over the data per group; it says which", metavar="GB")
    write: str = opt("scores", "scores: forget/ and retain/ fp32 scores (8 bytes per parameter); weights: the ratio w "
                     "itself", choices=("scores", "weights"))
    weight_dtype: str = opt("fp16", "dtype of w with --write weights", choices=DTYPE_NAMES)
    alpha: float = opt(1.0, ALPHA_HELP)
    power: float = opt(1.0, POWER_HELP)
    eps: float = opt(1e-16, EPS_HELP)
    hold_out: float | None = opt(None, HOLD_OUT_HELP + "; give calibrate's value (default 0.2)", metavar="FRACTION")
    offload: bool | None = opt(None, "accumulators in host memory (True) or on the device (False); None: chosen "
                               "under max_memory (importance.place_accumulators)", hidden=True)
    group_bytes: int | None = opt(None, "accumulator bytes per parameter group, set directly", hidden=True)


@dataclass(kw_only=True)
class CalibrateOptions:
    keep_retain: float = opt(0.95, "keep retain answer probability ≥ this × θ_full's on the held-back rows")
    lams: tuple = opt(DEFAULT_LAMS, "grid walked upwards until the retain floor breaks, then bisected", type=float,
                      nargs="+", metavar="λ", to_field=tuple)
    bisect: int = opt(4, "halvings between the last λ that keeps the floor and the next")
    forget_target: str = opt("max", "max: most forgetting the floor allows; base: until forget probability reaches "
                             "θ_0's; audit: until the forget rows cannot be told from --holdout rows (the attack's "
                             "AUC interval reaches --audit-target)", choices=("max", "base", "audit"))
    pretrained: str | None = opt(None, "θ_0, the model that never saw the data (--forget-target base)")
    audit_attack: str = opt("minkpp", "--forget-target audit: the membership attack (perta-fast audit)",
                            choices=("loss", "zlib", "mink", "minkpp"))
    audit_target: float = opt(0.5, "--forget-target audit: the AUC to reach, a retrained model's (from its perta-fast "
                              "audit) or 0.5 (indistinguishable)", type=float)
    hold_out: float = opt(0.2, HOLD_OUT_HELP, metavar="FRACTION")
    generate: bool = opt(True, "greedy exact match at each point (reported; the choice uses probabilities)",
                         hidden=True)
    max_new_tokens: int = opt(32, hidden=True)
    max_length: int = opt(256, "tokens per sample (prompt + answer; a text's window)", type=positive)
    batch_size: int = opt(GENERATE_BATCH, "questions decoded together (exact match)", type=positive)
    device: str | None = opt(None, DEVICE_HELP)
    dtype: str = _dtype()
    bf16_autocast: bool = opt(False, BF16_HELP)


@dataclass(kw_only=True)
class EvalOptions:
    batch_size: int = opt(GENERATE_BATCH, "questions decoded together", type=positive)
    max_new_tokens: int = opt(200, "TOFU generates up to 200 tokens", type=positive)
    max_length: int = opt(512, "tokens per sample (prompt + answer)", type=positive)
    generate: bool = opt(True, "skip greedy answers (no ROUGE-L, no model utility)", negate="--no-generate")
    device: str | None = opt(None, DEVICE_HELP)
    dtype: str = _dtype()
    bf16_autocast: bool = opt(False, BF16_HELP)


@dataclass(kw_only=True)
class AuditOptions:
    """`audit`: membership-inference attacks on forget rows against holdout rows (perta_fast.audit)."""
    attacks: str = opt("auto", "comma-separated of loss, zlib, mink, minkpp, reference (needs --reference), gradnorm; "
                       "auto: all, reference only when --reference is given")
    k: float = opt(0.4, "Min-K's and Min-K++'s share of a row's lowest tokens", type=float)
    max_length: int = opt(256, "tokens per sample, as training cuts them", type=positive)
    batch_size: int = opt(8, "samples per forward", type=positive)
    bootstrap: int = opt(1000, "resamples for each AUC's 95 percent interval", type=positive)
    device: str | None = opt(None, DEVICE_HELP)
    dtype: str = _dtype()
    bf16_autocast: bool = opt(False, BF16_HELP)


@dataclass(kw_only=True)
class UnlearnOptions:
    """`unlearn`: θ_ft (finetune), importance, merge, calibration (calibration) and a quick evaluation."""
    method: str = opt("perta-grad", "how w is made: PerTA with grad or fisher importance, or TV (w ≡ 1)",
                      choices=("perta-grad", "perta-fisher", "tv"))
    lam: float | str = opt(1.0, "λ: how far to step against the task vector; auto: calibrated on held-back rows "
                           "(see calibrate)", type=lam_value)
    alpha: float = opt(1.0, ALPHA_HELP)
    power: float = opt(1.0, POWER_HELP)
    eps: float = opt(1e-16, EPS_HELP)
    finetune: FinetuneOptions = opt(factory=lambda: FinetuneOptions(epochs=5, lr=1e-4))
    batch_size: int = opt(8, "rows per step (training and importance)", type=positive)
    max_length: int = opt(256, "tokens per sample (prompt + answer)", type=positive)
    max_samples: int | None = opt(None, "use the first N rows of each set", type=positive)
    importance_model: str | None = opt(None, "estimate importance here (e.g. θ_0) instead of θ_full")
    device: str | None = opt(None, DEVICE_HELP)
    evaluate: bool = opt(True, "skip the quick evaluation at the end", negate="--no-eval")
    eval_samples: int | None = opt(64, "evaluate on the first N rows of each set (0: all)")
    require_forgotten: bool = opt(False, "exit with code 3 unless the forget set was measured forgotten: by the audit "
                                  "with --holdout, else by forget probability below 0.95 × θ_full's")
    dtype: str = _dtype("every step's model dtype (auto: the checkpoint's own)")
    gradient_checkpointing: bool = opt(False, CKPT_HELP)
    max_memory: float | None = opt(None, "importance's memory budget (see importance)", metavar="GB")
    write: str = opt("scores", "importance file: fp32 scores, or fp16 ratio weights for this α, p, ε (4x smaller)",
                     choices=("scores", "weights"))
    keep_work: bool = opt(False, "keep θ_ft and the importance file (derived from the forget set) for a rerun to "
                          "reuse; by default they are deleted once the output is written")
    # how lam="auto" chooses; on the command line the flags it shares with the fields above (--batch-size,
    # --device, --dtype) set both, hence its batch of 8 questions decoded together here
    calibration: CalibrateOptions = opt(factory=lambda: CalibrateOptions(batch_size=8))


@dataclass(kw_only=True)
class DemoOptions:
    n_people: int = opt(10, "invented people the base model learns", flag="--people", type=positive)
    n_forget: int = opt(2, "of them, the ones to forget", flag="--forget-people", type=positive)
    seed: int = opt(0, "the facts, the data order")
    lam: float | str = opt("auto", "λ of the merges the table shows; auto: each method's own, as `unlearn --lam auto "
                           "--forget-target audit` chooses it against held-out invented people", type=lam_value)
    holdout_people: int = opt(8, "invented people never trained on: the audit's holdout facts", type=positive)
    sweep: tuple = opt((0.25, 0.5, 1.0, 2.0, 4.0), hidden=True)
    full: FinetuneOptions = opt(factory=lambda: FinetuneOptions(epochs=8, lr=3e-4, batch_size=8), hidden=True)
    forget_ft: FinetuneOptions = opt(factory=lambda: FinetuneOptions(epochs=5, lr=3e-4, batch_size=8), hidden=True)
    batch_size: int = opt(8, hidden=True)
    device: str | None = opt(None, DEVICE_HELP)
    lora_rank: int | None = opt(None, "also unlearn with a LoRA θ_ft of this rank", type=int)
    forget_lora: FinetuneOptions = opt(factory=lambda: FinetuneOptions(epochs=5, lr=1e-3, batch_size=8), hidden=True)


@dataclass(kw_only=True)
class PlanOptions:
    lora_rank: int | None = opt(None, "plan a LoRA θ_ft of this rank", type=int)
    lora_targets: str = opt("all-linear", "all-linear, or module names: q_proj,v_proj,…")
    dtype: str = opt("auto", "the model's dtype (auto: the checkpoint's own)", choices=DTYPE_CHOICES)
    method: str = opt("fisher", "the importance estimator", choices=("grad", "fisher"))
    batch_size: int = opt(8, "rows per step", type=positive)
    max_length: int = opt(256, "tokens per sample", type=positive)
    checkpointing: bool = opt(False, CKPT_HELP, flag="--gradient-checkpointing")
    memory_gb: float | None = opt(None, "what you have, e.g. 80GB: each step says fits or does not fit",
                                  flag="--memory", type=str, to_field=lambda text: parse_gb(text))
    device: str = opt("cuda", "whose memory the figures are", choices=("cuda", "cpu"))
    bf16_autocast: bool = opt(False, "training (baseline), eval and calibrate with --bf16-autocast over fp32 weights: "
                              "autocast's bf16 copy of every weight comes on top")


def parse_gb(text: str) -> float:
    """'80GB', '80', '24 GB' → GB as a number."""
    t = text.strip().upper().removesuffix("GB").removesuffix("G").strip()
    try:
        gb = float(t)
    except ValueError:
        raise PertaError(f"--memory {text!r}: expected a size such as 80GB") from None
    if gb <= 0:
        raise PertaError(f"--memory {text!r}: must be positive")
    return gb
