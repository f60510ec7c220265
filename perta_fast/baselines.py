"""Training-based unlearning that users compare PerTA against: gradient ascent (GA) and NPO.

GA maximises the forget set's loss. NPO (Zhang et al., 2024) minimises −(2/β)·log σ(−β·log(π_θ/π_ref))
over forget answers, π_ref the model before unlearning, plus the retain set's loss (as in the
open-unlearning recipe). Both run fine-tuning's training loop (perta_fast.train.train_in_place) with
their own loss: AdamW with linear warm-up over the first epoch.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict
from pathlib import Path

from .console import log
from .data import QA, batches, check_sets, collate, data_hash, encode, logits_of, pad_id
from .errors import PertaError
from .loss import per_sample_loss
from .outputs import check_output_path
from .models import load_model, save_model
from .options import BaselineOptions
from .train import train_in_place

METHODS = ("ga", "npo")


def sequence_nll(logits, labels):
    """Summed (not mean) answer-token NLL per sample: NPO's log π(y|x) is a sequence log-probability."""
    return per_sample_loss(logits, labels) * (labels[:, 1:] != -100).sum(1).clamp_min(1)


def _baseline_loss(opts, ref_nll, retain_enc, pad):
    """Each forget sample's GA or NPO loss (NPO: plus the retain loss of the next retain row, taken in
    turn, so the batch mean is the forget term's mean plus the retain term's)."""
    import torch.nn.functional as F

    retain_order = itertools.cycle(range(len(retain_enc)))

    def loss(net, ids, mask, labels, rows):
        logits = logits_of(net, ids, mask)
        if opts.method == "ga":
            return -per_sample_loss(logits, labels)
        log_ratio = ref_nll[rows] - sequence_nll(logits, labels)  # log π_θ − log π_ref
        per_sample = -(2 / opts.beta) * F.logsigmoid(-opts.beta * log_ratio)
        if opts.retain_weight:
            r = [retain_enc[next(retain_order)] for _ in rows]
            rids, rmask, rlabels = (t.to(ids.device) for t in collate(r, pad))
            per_sample = per_sample + opts.retain_weight * per_sample_loss(logits_of(net, rids, rmask), rlabels)
        return per_sample
    return loss


def unlearn_by_training(model_dir: str | Path, forget: list[QA], retain: list[QA], out: str | Path,
                        options: BaselineOptions | None = None, overwrite: bool = False, after_step=None) -> dict:
    """Unlearn `forget` from the checkpoint in `model_dir` by GA or NPO; write the result to `out`.
    `after_step(model, steps_done)` -> True stops the training there (train_in_place)."""
    import torch

    opts = options or BaselineOptions()
    if opts.method not in METHODS:
        raise PertaError(f"unknown baseline {opts.method!r} (expected one of {', '.join(METHODS)})")
    if opts.method == "npo" and opts.retain_weight and check_sets(forget, retain):  # GA reads no retain rows
        log.warning("forget rows are in the retain set too: NPO both pushes their loss up and pulls it down")
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
    losses = []
    train_in_place(model, tok, forget, opts, desc=opts.method, source=str(model_dir),
                   batch_loss=_baseline_loss(opts, ref, retain_enc, pad), step_losses=losses, after_step=after_step)
    record = {"base": str(Path(model_dir).resolve()), "forget_sha256": data_hash(forget),
              "retain_sha256": data_hash(retain), "options": asdict(opts), "steps": len(losses), "step_losses": losses,
              "seconds": round(time.perf_counter() - t0, 2)}
    save_model(model, tok, out, overwrite, inputs=(model_dir,),
               extra_files={"perta_baseline.json": json.dumps(record, indent=2)})
    return record
