"""LoRA task vectors: reading a peft adapter folder as τ = scale · B·A per targeted weight, without
peft or transformers (the merge path stays light), and training one with peft (`train.finetune`).

A targeted weight's task vector is a product of two thin factors, so the merge forms it a block of
rows at a time (`delta_rows`) and never holds θ_ft. τ of a stored tensor is written τ = Σ scale · L·R
with L (out, r) and R (r, in): L = B, R = A for a Linear; L = Aᵀ, R = Bᵀ for an Embedding and for
fan-in-fan-out (Conv1D) layers, whose stored weight is the transpose of B·A. The sign of an unlearning
step goes onto the product, never onto A and B.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import PertaError
from .io import Checkpoint, SafetensorsFile, read_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# adapter features whose effect is not τ = scale·B·A on the base weights: refused by name
UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA bias", "modules_to_save": "modules_to_save",
               "trainable_token_indices": "trainable_token_indices", "target_parameters": "target_parameters",
               "layer_replication": "layer_replication", "alpha_pattern": "alpha_pattern",
               "use_qalora": "QALoRA", "use_bdlora": "BD-LoRA", "alora_invocation_tokens": "aLoRA",
               "arrow_config": "Arrow", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
               "kasa_config": "KaSA"}
KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
                 r"|base_layer\.weight)$")


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


@dataclass
class Factor:
    """One LoRA term of a stored tensor's τ: scale · L·R, L (out, r) and R (r, in) read lazily."""
    module: str
    a_key: str  # peft's A (r, in) or, for Embedding / fan-in-fan-out layers, the factor that becomes Lᵀ
    b_key: str
    transposed: bool  # L = Aᵀ, R = Bᵀ (Embedding / fan-in-fan-out) instead of L = B, R = A
    scale: float


@dataclass
class LoraAdapter:
    folder: Path
    config: dict
    file: SafetensorsFile
    targets: dict[str, list[Factor]] = field(default_factory=dict)  # stored tensor name -> its LoRA terms

    def stored(self, f: Factor) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B as stored in the adapter file."""
        return self.file.get(f.a_key), self.file.get(f.b_key)

    @staticmethod
    def factors(f: Factor, a: torch.Tensor, b: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) in fp32 on `device` from the stored A and B: a few MB even for an 8B model's largest layer."""
        a, b = a.to(device=device, dtype=torch.float32), b.to(device=device, dtype=torch.float32)
        return (a.t(), b.t()) if f.transposed else (b, a)


def _check_config(config: dict, path: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise PertaError(f"{path}: adapter type {config.get('peft_type')} is not supported (only LoRA)")
    for key, feature in UNSUPPORTED.items():
        if config.get(key):
            raise PertaError(f"{path}: adapter uses {feature}, which the merge cannot reproduce exactly; refused")
    if config.get("bias", "none") != "none":
        raise PertaError(f"{path}: adapter trains biases (bias={config['bias']!r}), which the merge cannot reproduce; refused")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise PertaError(f"{path}: lora_alpha must be a number")


def read_adapter(folder: str | Path, base: Checkpoint) -> LoraAdapter:
    """A peft LoRA adapter folder, checked against the base checkpoint from headers alone."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    config = read_json(config_path)
    _check_config(config, config_path)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise PertaError(f"{folder}: adapter folder has no {WEIGHTS_NAME} (adapter weights missing)")
    file = SafetensorsFile(weights)
    parts: dict[str, dict[str, str]] = {}
    for key in file.keys():
        m = KEY.match(key[len(PREFIX):] if key.startswith(PREFIX) else key)
        if m is None:
            raise PertaError(f"{weights}: unexpected tensor {key!r} (not a LoRA factor; DoRA or another adapter type?)")
        parts.setdefault(m["module"], {})[m["part"]] = key
    if not parts:
        raise PertaError(f"{weights}: adapter holds no LoRA factors")
    for module, keys in parts.items():
        if "base_layer.weight" in keys:
            _check_saved_base_layer(file, keys.pop("base_layer.weight"), _stored_name(module, base, folder), base, weights)
    parts = {m: k for m, k in parts.items() if k}
    adapter = LoraAdapter(folder, config, file)
    rslora = bool(config.get("use_rslora"))
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for module, keys in parts.items():
        embedding = "lora_embedding_A" in keys or "lora_embedding_B" in keys
        a_key = keys.get("lora_embedding_A" if embedding else "lora_A.weight")
        b_key = keys.get("lora_embedding_B" if embedding else "lora_B.weight")
        if a_key is None or b_key is None:
            raise PertaError(f"{weights}: module {module} has only one of its two LoRA factors")
        name = _stored_name(module, base, folder)
        (r, a_in), a_dtype = file.info(a_key)[0], file.info(a_key)[1]
        (b_out, r_b), _ = file.info(b_key)
        if r != r_b or r <= 0:
            raise PertaError(f"{weights}: module {module} has factors of ranks {r} and {r_b}")
        transposed = embedding or fan_in_fan_out
        out_dim, in_dim = (a_in, b_out) if transposed else (b_out, a_in)
        shape = base.info(name)[0]
        if tuple(shape) != (out_dim, in_dim):
            raise PertaError(f"{folder}: adapter is for another model (module {module} makes a "
                             f"{out_dim}x{in_dim} update, {base.folder} stores {name} as {'x'.join(map(str, shape))})")
        if not a_dtype.is_floating_point:
            raise PertaError(f"{weights}: tensor {a_key} is not floating point")
        alpha = float(config["lora_alpha"])
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        adapter.targets.setdefault(name, []).append(Factor(module, a_key, b_key, transposed, scale))
    return adapter


def _check_saved_base_layer(file: SafetensorsFile, key: str, name: str, base: Checkpoint, weights: Path) -> None:
    """peft saves a targeted embedding/output layer's own weights beside its factors; loading the adapter
    puts them back, so they must be the base's, or the adapter belongs to another (e.g. resized) model."""
    if not torch.equal(file.get(key), base.get(name)):
        raise PertaError(f"{weights}: adapter is for another model (its saved copy of {name} differs from "
                         f"{base.folder}'s)")


def _stored_name(module: str, base: Checkpoint, adapter_folder: Path) -> str:
    """The checkpoint tensor a module's weight is stored as; a tied lm_head is stored as the embedding."""
    name = f"{module}.weight"
    if name in base:
        return name
    if base.ties_embeddings and module.split(".")[-1] == "lm_head":
        tied = next((n for n in base.names() if n.endswith("embed_tokens.weight")), None)
        if tied is not None:
            return tied
    raise PertaError(f"{adapter_folder}: adapter is for another model (module {module} has no weight in {base.folder})")


def adapter_targets(folder: str | Path, base_dir: str | Path) -> list[str]:
    """Stored names of the tensors the adapter changes: the only ones whose importance is needed."""
    return list(read_adapter(folder, Checkpoint(base_dir, allow_pickle=True)).targets)


def task_vectors(folder: str | Path, base_dir: str | Path) -> dict[str, torch.Tensor]:
    """τ of every targeted tensor, whole, in fp32: for in-memory work on small models (the λ sweep)."""
    adapter = read_adapter(folder, Checkpoint(base_dir, allow_pickle=True))
    out = {}
    for name, terms in adapter.targets.items():
        factors = [(f, *adapter.factors(f, *adapter.stored(f))) for f in terms]
        rows, cols = factors[0][1].shape[0], factors[0][2].shape[1]
        out[name] = delta_rows(factors, 0, rows, torch.empty(rows, cols))
    return out


def delta_rows(factors: list[tuple[Factor, torch.Tensor, torch.Tensor]], start: int, stop: int,
               out: torch.Tensor) -> torch.Tensor:
    """τ[start:stop] = Σ scale · L[start:stop] @ R, in fp32, written into `out` ((stop − start, in))."""
    for i, (f, left, right) in enumerate(factors):
        if i == 0:
            torch.matmul(left[start:stop], right, out=out)
            out.mul_(f.scale)
        else:
            out.addmm_(left[start:stop], right, alpha=f.scale)
    return out
