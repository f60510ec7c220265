"""Fine-tuning on question/answer rows: answer-only loss through the chat template, AdamW; either every
weight (a checkpoint folder out) or a peft LoRA adapter over the frozen model (an adapter folder out).

Memory per parameter P of the model: full fine-tuning holds weights, gradients and AdamW's two
moments in the model's dtype (4·bytes(dtype)·P: 16 P in fp32, 8 P in bf16); LoRA holds the frozen
weights (bytes(dtype)·P) plus the adapter in fp32 with its gradients and moments (16 bytes each
adapter parameter, ~0.5 % of P at rank 16). Activations come on top; gradient checkpointing keeps
one decoder layer's instead of all of them.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from . import distributed, dtypes
from .console import bar, log
from .data import QA, collate, data_hash, encode, logits_of, pad_id, set_summary
from .dtypes import autocast, warn_if_emulated_bf16
from .errors import PertaError
from .io import content_sha256
from .faults import kill_point
from .hf import is_conv1d
from .outputs import atomic_dir, check_output_path, resume_dir, resume_state, save_tensors
from .loss import per_sample_loss
from .models import load_model, save_model
from .options import FinetuneOptions, TrainingOptions  # noqa: F401  (importable here, as always)
from .memory import release_freed_memory


def lora_config(opts: FinetuneOptions):
    from peft import LoraConfig

    if opts.lora_rank is None or opts.lora_rank <= 0:
        raise PertaError(f"--lora-rank must be a positive integer, got {opts.lora_rank}")
    targets = opts.lora_targets if opts.lora_targets == "all-linear" else \
        [t.strip() for t in opts.lora_targets.split(",") if t.strip()]
    if not targets:
        raise PertaError("--lora-targets is empty (all-linear, or module names such as q_proj,v_proj)")
    alpha = opts.lora_alpha if opts.lora_alpha is not None else 2 * opts.lora_rank
    return LoraConfig(r=opts.lora_rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")


def with_lora(model, opts: FinetuneOptions, source: str):
    """The model wrapped in a fresh LoRA adapter (peft), seeded, base weights frozen."""
    import torch
    from peft import get_peft_model

    config = lora_config(opts)
    if opts.lora_targets == "all-linear" and any(p.dim() >= 3 for p in model.parameters()):
        # fused MoE experts: peft's all-linear would add them as target_parameters, whose τ the merge cannot form
        # exactly (perta_fast.lora refuses such adapters); the Linear modules named one by one keep it to Linears
        output = model.get_output_embeddings()
        config.target_modules = [n for n, m in model.named_modules()
                                 if (isinstance(m, torch.nn.Linear) or is_conv1d(m)) and m is not output]
        log.info("%s: its experts are fused 3-D parameters, which a LoRA adapter does not train (τ = 0 there): "
                 "every Linear but the output layer is targeted; full fine-tuning trains the experts", source)
    torch.manual_seed(opts.seed)
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as e:  # peft's word for targets that match no module
        raise PertaError(f"{source}: --lora-targets {opts.lora_targets}: {str(e).splitlines()[0]}") from None
    if wrapped.peft_config["default"].target_parameters:
        raise PertaError(f"{source}: --lora-targets {opts.lora_targets}: peft targets "
                         f"{sorted(wrapped.peft_config['default'].target_parameters)[0]} of "
                         f"{model.config.model_type} as a fused parameter (target_parameters), whose task vector the "
                         "merge cannot form exactly; target Linear modules (q_proj,…) or fine-tune in full")
    return wrapped


class TrainCheckpoint:
    """A fine-tuning run's state beside its output (.OUT.resume/): the trainable weights (all of them, or
    the adapter's), AdamW's state, the data order's RNG state at the epoch's start and the position, saved
    together atomically every `every` steps, so `resume` continues a killed run exactly."""

    def __init__(self, out: Path, fingerprint: dict, every: int | None, resume: bool):
        self.dir = resume_dir(out)
        self.fingerprint, self.every = fingerprint, every
        if resume:
            resume_state(self.dir, self.dir / "checkpoint" / "state.json", fingerprint)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def load(self, model, masters: MasterWeights, optim) -> dict:
        import torch
        from safetensors.torch import load_file

        folder = self.dir / "checkpoint"
        weights = load_file(str(folder / "trainable.safetensors"))
        with torch.no_grad():
            for n, t in masters.trainable(model).items():
                t.copy_(weights[n])
        masters.weights_out()
        optim.load_state_dict(torch.load(folder / "optim.pt", weights_only=True))
        return json.loads((folder / "state.json").read_text())

    def save(self, model, masters: MasterWeights, optim, position: dict) -> None:
        import torch

        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_dir(self.dir / "checkpoint", overwrite=True) as tmp:
            save_tensors(masters.trainable(model), {}, tmp / "trainable.safetensors")
            torch.save(optim.state_dict(), tmp / "optim.pt")
            (tmp / "state.json").write_text(json.dumps({"fingerprint": self.fingerprint, **position}))
        kill_point("checkpoint")


class MasterWeights:
    """fp32 copies of the trainable bf16/fp16 weights, which AdamW steps instead of the weights themselves.
    A pure-bf16 update rounds to the weight's 8-bit mantissa at every step: one smaller than half an ulp is
    lost whole (at lr 1e-4, 36 % of τ's non-embedding entries exactly 0 and every norm weight unchanged in
    issue 33's run of `unlearn` on a bf16 model; 12.9 % and no norm on a 2-layer hidden-64 Llama, docs/cli.md). The forward and backward still run in the model's dtype; after each step the weights
    are the fp32 copies rounded to nearest, so updates accumulate in fp32 and reach the weights once they
    add up. Costs 4 bytes per trainable parameter (docs/memory.md)."""

    def __init__(self, model):
        import torch

        self.pairs = {n: (p, p.detach().float()) for n, p in model.named_parameters()
                      if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)}

    def params(self, model) -> list:
        """What the optimizer steps: the fp32 copy of a half-precision weight, else the weight."""
        return [self.pairs[n][1] if n in self.pairs else p for n, p in model.named_parameters() if p.requires_grad]

    def trainable(self, model) -> dict:
        """name -> the trainable weight as training holds it (the fp32 copy where there is one)."""
        return {n: self.pairs[n][1] if n in self.pairs else p.detach() for n, p in model.named_parameters()
                if p.requires_grad}

    def gradients_in(self) -> None:
        for p, master in self.pairs.values():
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    def weights_out(self) -> None:
        import torch

        with torch.no_grad():
            for p, master in self.pairs.values():
                p.copy_(master)

    def keep(self) -> None:
        """The model's weights become the fp32 copies themselves (each half-precision copy freed)."""
        for p, master in self.pairs.values():
            p.data = master
        self.pairs = {}


def answer_loss(net, ids, mask, labels, rows):
    """Each sample's mean answer-token cross-entropy: fine-tuning's loss."""
    return per_sample_loss(logits_of(net, ids, mask), labels)


def train_in_place(model, tokenizer, rows: list[QA], opts: TrainingOptions, desc: str = "finetune",
                   source: str = "model", checkpoint: TrainCheckpoint | None = None, resume: bool = False,
                   batch_loss=answer_loss, step_losses: list | None = None, keep_fp32: bool = False,
                   where: str = "the training rows", after_step=None) -> list[float]:
    """AdamW on the mean over the set of `batch_loss(net, ids, mask, labels, rows)`, each sample's loss
    (`rows`: the batch's indices into `rows`); returns the mean loss of each epoch. The one training
    loop: fine-tuning and the GA/NPO baselines (their losses) both run it. The learning rate ramps up
    linearly over `opts.warmup_epochs`; `step_losses` (a list) receives each step's mean loss. With `checkpoint`, the
    state is saved every `checkpoint.every` steps; `resume` starts from it. bf16/fp16 weights are trained through fp32
    master weights (MasterWeights); `keep_fp32` leaves the model holding them at the end instead of their rounding.
    `after_step(model, steps_done)` runs after each optimizer step; True ends training there (a search that
    stops unlearning once an audit says the forget set looks unseen)."""
    import torch

    torch.manual_seed(opts.seed)
    order_rng = random.Random(opts.seed)
    encoded = encode(tokenizer, rows, opts.max_length, where)
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    warn_if_emulated_bf16(device, opts.bf16_autocast)
    masters = MasterWeights(model)
    optim = torch.optim.AdamW(masters.params(model), lr=opts.lr, weight_decay=opts.weight_decay)
    warmup_steps = opts.warmup_epochs * -(-len(encoded) // opts.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / warmup_steps)) \
        if warmup_steps else None
    rank, size = distributed.rank_and_size()
    net = model
    if size > 1:  # DDP averages the ranks' gradients: each rank's loss is scaled so the average is the batch mean
        from torch.nn.parallel import DistributedDataParallel

        if opts.batch_size < size:
            raise PertaError(f"--batch-size {opts.batch_size} is smaller than the {size} torchrun ranks sharing each batch")
        net = DistributedDataParallel(model)
    model.train()
    epoch_losses, first_epoch, first_step, resumed_total = [], 0, 0, 0.0
    if resume:
        pos = checkpoint.load(model, masters, optim)
        order_rng.setstate((pos["rng"][0], tuple(pos["rng"][1]), pos["rng"][2]))
        epoch_losses, first_epoch, first_step, resumed_total = (pos["epoch_losses"], pos["epoch"], pos["step"],
                                                                pos["total"])
    per_epoch = -(-len(encoded) // opts.batch_size)
    done = first_epoch * per_epoch + first_step
    with bar(total=opts.epochs * per_epoch, initial=done, desc=desc, unit="step", show=rank == 0) as progress_bar:
        for epoch in range(first_epoch, opts.epochs):
            rng_at_start = order_rng.getstate()
            order = list(range(len(encoded)))
            order_rng.shuffle(order)
            total = resumed_total if epoch == first_epoch else 0.0
            for step, start in enumerate(range(0, len(order), opts.batch_size)):
                if epoch == first_epoch and step < first_step:
                    continue
                batch = order[start:start + opts.batch_size]
                mine, counts = distributed.shard(batch, rank, size)  # the whole batch in one process
                ids, mask, labels = (t.to(device) for t in collate([encoded[i] for i in mine], pad))
                with autocast(device, opts.bf16_autocast):
                    # the logits are not kept beyond the loss (nor a KV cache): they are the largest activation
                    losses = batch_loss(net, ids, mask, labels, mine)
                loss = losses.sum() / len(batch) * size if counts else losses.sum() * 0.0
                if not torch.isfinite(losses).all():
                    raise PertaError(f"{source}: {desc} loss is NaN/Inf (NaN weights in the checkpoint, or --lr too high?)")
                optim.zero_grad(set_to_none=True)
                loss.backward()
                masters.gradients_in()
                optim.step()
                masters.weights_out()
                if sched is not None:
                    sched.step()
                if step_losses is not None:
                    step_losses.append(float(loss.detach()))
                if device.type == "cpu":  # else each step's freed activations stay private memory
                    release_freed_memory()
                if counts:
                    total += float(losses.detach().sum())
                progress_bar.set_postfix(loss=f"{float(losses.detach().mean()):.3f}", refresh=False)
                progress_bar.update(1)  # drawn at the bar's own interval, not at every step
                done += 1
                if checkpoint is not None and checkpoint.every and done % checkpoint.every == 0:
                    checkpoint.save(model, masters, optim, {"epoch": epoch, "step": step + 1, "total": total,
                                                   "epoch_losses": epoch_losses, "rng": rng_at_start})
                if after_step is not None and after_step(model, done):
                    break
            else:
                epoch_losses.append(distributed.reduce_float(total) / len(encoded))
                continue
            break  # after_step stopped it: the partial epoch has no mean loss
    if keep_fp32:
        masters.keep()
    model.eval()
    return epoch_losses


def finetune(model_dir: str | Path, rows: list[QA], out: str | Path, options: FinetuneOptions | None = None,
             overwrite: bool = False, checkpoint_every: int | None = None, resume: bool = False,
             where: str = "the training rows") -> dict:
    """Fine-tune the checkpoint in `model_dir` on `rows`, writing a new checkpoint folder to `out` (or a
    peft adapter folder). `checkpoint_every` N steps saves the run's state beside `out`; `resume` continues
    a killed run from it and ends with the same weights as an uninterrupted run (same batches, same order)."""
    opts = options or FinetuneOptions()
    check_output_path(Path(out), overwrite, (model_dir,))  # refuse before training, not after
    if opts.lora_rank is not None:
        lora_config(opts)  # bad LoRA options fail before the model is loaded
    if checkpoint_every is not None and checkpoint_every <= 0:
        raise PertaError(f"--checkpoint-every must be a positive number of steps, got {checkpoint_every}")
    if checkpoint_every or resume:
        distributed.refuse("--checkpoint-every/--resume")
    fingerprint = {"base_sha256": content_sha256(model_dir), "data_sha256": data_hash(rows),
                   "options": json.dumps(asdict(opts), sort_keys=True)}
    distributed.setup(opts.device)
    distributed.agree(fingerprint, "the fine-tuning run")
    checkpoint = TrainCheckpoint(Path(out), fingerprint, checkpoint_every, resume) \
        if checkpoint_every or resume else None
    t0 = time.perf_counter()
    model, tok = load_model(model_dir, opts.device, opts.dtype, gradient_checkpointing=opts.gradient_checkpointing)
    if opts.lora_rank is not None:
        model = with_lora(model, opts, str(model_dir))
    losses = train_in_place(model, tok, rows, opts, source=str(model_dir), checkpoint=checkpoint, resume=resume,
                            keep_fp32=opts.save_dtype == "auto", where=where)
    if opts.save_dtype != "auto":
        model.to(dtypes.torch_dtype(opts.save_dtype))
    record = {"base": str(Path(model_dir).resolve()), "base_sha256": fingerprint["base_sha256"], "n_rows": len(rows),
              "data_sha256": data_hash(rows), "data": set_summary(rows, encode(tok, rows, opts.max_length)),
              "options": asdict(opts), "epoch_losses": losses, "seconds": round(time.perf_counter() - t0, 2),
              "kind": "lora adapter" if opts.lora_rank is not None else "checkpoint",
              "ranks": distributed.rank_and_size()[1]}
    if distributed.is_main():  # every rank holds the same weights
        save_model(model, tok, out, overwrite, inputs=(model_dir,),
                   extra_files={"perta_finetune.json": json.dumps(record, indent=2)},
                   tokenizer_files=opts.lora_rank is None)
    distributed.barrier()
    if distributed.is_main():  # ours, or a killed earlier run's: a checkpoint of a finished output is obsolete
        shutil.rmtree(resume_dir(out), ignore_errors=True)
    return record
