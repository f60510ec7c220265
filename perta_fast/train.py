"""Fine-tuning on question/answer rows: answer-only loss through the chat template, AdamW."""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .data import QA, batches, data_hash, encode, pad_id, per_sample_loss
from .errors import PertaError
from .io import check_output_path
from .models import load_model, save_model


@dataclass
class FinetuneOptions:
    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 8
    max_length: int = 256
    seed: int = 0
    weight_decay: float = 0.0
    device: str | None = None
    bf16_autocast: bool = False  # mixed precision: bf16 matmuls, fp32 weights and optimizer state


def autocast(device, on: bool):
    import contextlib

    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def train_in_place(model, tokenizer, rows: list[QA], opts: FinetuneOptions, desc: str = "finetune",
                   source: str = "model") -> list[float]:
    """AdamW on the set's loss (mean of per-sample answer losses); returns the mean loss of each epoch."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(opts.seed)
    order_rng = random.Random(opts.seed)
    encoded = encode(tokenizer, rows, opts.max_length)
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=opts.lr,
                              weight_decay=opts.weight_decay)
    model.train()
    epoch_losses = []
    steps = opts.epochs * -(-len(encoded) // opts.batch_size)
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        for _ in range(opts.epochs):
            order = list(range(len(encoded)))
            order_rng.shuffle(order)
            total = 0.0
            for ids, mask, labels in batches([encoded[i] for i in order], opts.batch_size, pad):
                ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
                with autocast(device, opts.bf16_autocast):
                    logits = model(input_ids=ids, attention_mask=mask).logits
                losses = per_sample_loss(logits, labels)
                loss = losses.mean()
                if not torch.isfinite(loss):
                    raise PertaError(f"{source}: training loss is NaN/Inf (NaN weights in the checkpoint, or --lr too high?)")
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                total += float(losses.detach().sum())
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            epoch_losses.append(total / len(encoded))
    model.eval()
    return epoch_losses


def finetune(model_dir: str | Path, rows: list[QA], out: str | Path, options: FinetuneOptions | None = None,
             overwrite: bool = False) -> dict:
    """Fine-tune the checkpoint in `model_dir` on `rows`, writing a new checkpoint folder to `out`."""
    opts = options or FinetuneOptions()
    check_output_path(Path(out), overwrite, (model_dir,))  # refuse before training, not after
    t0 = time.perf_counter()
    model, tok = load_model(model_dir, opts.device)
    losses = train_in_place(model, tok, rows, opts, source=str(model_dir))
    record = {"base": str(Path(model_dir).resolve()), "n_rows": len(rows), "data_sha256": data_hash(rows),
              "options": asdict(opts), "epoch_losses": losses, "seconds": round(time.perf_counter() - t0, 2)}
    save_model(model, tok, out, overwrite, inputs=(model_dir,),
               extra_files={"perta_finetune.json": json.dumps(record, indent=2)})
    return record
