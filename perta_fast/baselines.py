"""Training-based unlearning that users compare PerTA against: gradient ascent (GA) and NPO.

GA maximises the forget set's loss. NPO (Zhang et al., 2024) minimises −(2/β)·log σ(−β·log(π_θ/π_ref))
over forget answers, π_ref the model before unlearning, plus the retain set's loss (as in the
open-unlearning recipe). Both run AdamW with linear warm-up over the first epoch.
"""
from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .data import QA, batches, collate, data_hash, encode, pad_id
from .errors import PertaError
from .loss import per_sample_loss
from .io import check_output_path
from .models import load_model, save_model
from .train import autocast

METHODS = ("ga", "npo")


@dataclass
class BaselineOptions:
    method: str = "ga"
    epochs: int = 10
    lr: float = 1e-5
    batch_size: int = 8
    weight_decay: float = 0.01
    beta: float = 0.1  # NPO's inverse temperature
    retain_weight: float = 1.0  # NPO's retain-loss weight (GA uses none)
    max_length: int = 256
    seed: int = 0
    device: str | None = None
    bf16_autocast: bool = False  # mixed precision: bf16 matmuls, fp32 weights and optimizer state
    dtype: str | None = None  # weights' dtype: auto (None) = the checkpoint's own
    gradient_checkpointing: bool = False


def sequence_nll(logits, labels):
    """Summed (not mean) answer-token NLL per sample: NPO's log π(y|x) is a sequence log-probability."""
    return per_sample_loss(logits, labels) * (labels[:, 1:] != -100).sum(1).clamp_min(1)


def _forget_loss(model, ids, mask, labels, ref_nll, opts):
    import torch.nn.functional as F

    with autocast(ids.device, opts.bf16_autocast):
        logits = model(input_ids=ids, attention_mask=mask).logits
    if opts.method == "ga":
        return -per_sample_loss(logits, labels).mean()
    log_ratio = ref_nll - sequence_nll(logits, labels)  # log π_θ − log π_ref
    return -(2 / opts.beta) * F.logsigmoid(-opts.beta * log_ratio).mean()


def unlearn_by_training(model_dir: str | Path, forget: list[QA], retain: list[QA], out: str | Path,
                        options: BaselineOptions | None = None, overwrite: bool = False) -> dict:
    """Unlearn `forget` from the checkpoint in `model_dir` by GA or NPO; write the result to `out`."""
    import torch
    from tqdm import tqdm

    opts = options or BaselineOptions()
    if opts.method not in METHODS:
        raise PertaError(f"unknown baseline {opts.method!r} (expected one of {', '.join(METHODS)})")
    check_output_path(Path(out), overwrite, (model_dir,))
    t0 = time.perf_counter()
    torch.manual_seed(opts.seed)
    model, tok = load_model(model_dir, opts.device, opts.dtype, gradient_checkpointing=opts.gradient_checkpointing)
    device = next(model.parameters()).device
    pad = pad_id(tok)
    forget_enc, retain_enc = encode(tok, forget, opts.max_length), encode(tok, retain, opts.max_length)
    ref = torch.zeros(len(forget_enc), device=device)
    if opts.method == "npo":
        with torch.no_grad():
            for start, (ids, mask, labels) in zip(range(0, len(forget_enc), opts.batch_size),
                                                   batches(forget_enc, opts.batch_size, pad)):
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                ref[start:start + len(ids)] = sequence_nll(logits, labels.to(device))
    optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    steps_per_epoch = -(-len(forget_enc) // opts.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / steps_per_epoch))
    rng = random.Random(opts.seed)
    retain_order = itertools.cycle(range(len(retain_enc)))
    model.train()
    losses = []
    with tqdm(total=opts.epochs * steps_per_epoch, desc=opts.method, unit="step") as bar:
        for _ in range(opts.epochs):
            order = list(range(len(forget_enc)))
            rng.shuffle(order)
            for start in range(0, len(order), opts.batch_size):
                idx = order[start:start + opts.batch_size]
                ids, mask, labels = (t.to(device) for t in collate([forget_enc[i] for i in idx], pad))
                loss = _forget_loss(model, ids, mask, labels, ref[idx], opts)
                if opts.method == "npo" and opts.retain_weight:
                    r = [retain_enc[next(retain_order)] for _ in idx]
                    rids, rmask, rlabels = (t.to(device) for t in collate(r, pad))
                    with autocast(device, opts.bf16_autocast):
                        rlogits = model(input_ids=rids, attention_mask=rmask).logits
                    loss = loss + opts.retain_weight * per_sample_loss(rlogits, rlabels).mean()
                if not torch.isfinite(loss):
                    raise PertaError(f"{model_dir}: {opts.method} loss became NaN/Inf (try a lower --lr)")
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                sched.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    record = {"base": str(Path(model_dir).resolve()), "forget_sha256": data_hash(forget),
              "retain_sha256": data_hash(retain), "options": asdict(opts), "step_losses": losses,
              "seconds": round(time.perf_counter() - t0, 2)}
    save_model(model, tok, out, overwrite, inputs=(model_dir,),
               extra_files={"perta_baseline.json": json.dumps(record, indent=2)})
    return record
