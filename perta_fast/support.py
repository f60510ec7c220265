"""What each step can do with a model, decided from its folder before any work: its config built into the
architecture on the meta device (no weights read, no memory), its stored tensor names and its tokenizer files.
`perta-fast info --model DIR` prints it; `unlearn` checks the steps it will run before it trains anything."""
from __future__ import annotations

from pathlib import Path

from .errors import PertaError
from .hf import meta_model, stored_layout
from .importance.estimators import _unique_params, fisher_blocker
from .importance.run import unstored
from .io import read_json
from .models import checkpoint_dtype

STEPS = ("finetune", "finetune --lora-rank", "importance --method grad", "importance --method fisher", "merge")


def _has_chat_template(folder: Path) -> bool:
    if any(folder.glob("chat_template.*")):
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(read_json(config).get("chat_template"))


def model_support(folder: str | Path) -> dict:
    """{"model_type", "steps": {step: None (supported) or why not}, "notes": [what a user should know]}."""
    folder = Path(folder)
    config = read_json(folder / "config.json")
    kind = config.get("model_type", "?")
    steps: dict[str, str | None] = {"merge": None}  # streams stored tensors: any architecture
    notes = []
    try:
        model = meta_model(config, folder / "config.json")
    except PertaError as e:
        why = str(e)
        return {"model_type": kind, "steps": {s: steps.get(s, why) for s in STEPS}, "notes": notes}
    steps["finetune"] = steps["finetune --lora-rank"] = None
    params = _unique_params(model)
    if any(p.dim() >= 3 for p in params.values()):
        notes.append(f"{kind}'s experts are fused 3-D parameters: a LoRA adapter (all-linear) leaves them frozen "
                     "(τ = 0 there); full fine-tuning trains them")
    steps["importance --method grad"] = None
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        steps["importance --method grad"] = unstored(folder, stored_layout(model, params), kind)
        dtype = str(checkpoint_dtype(folder)).removeprefix("torch.")
        if dtype in ("bfloat16", "float16"):
            notes.append(f"weights are {dtype}: full fine-tuning keeps fp32 master weights (small updates are not "
                         "rounded away); LoRA trains fp32 adapters")
    blocked = fisher_blocker(model)
    steps["importance --method fisher"] = steps["importance --method grad"] or blocked
    if not _has_chat_template(folder):
        notes.append("the tokenizer has no chat template: rows are fed as 'Question: …\\nAnswer: …' text")
    return {"model_type": kind, "steps": {s: steps[s] for s in STEPS}, "notes": notes}


def require(folder: str | Path, steps: list[str]) -> None:
    """A one-line error naming the model type, the step and the alternative when any of `steps` cannot run."""
    support = model_support(folder)
    for step in steps:
        why = support["steps"][step]
        if why:
            raise PertaError(f"{folder}: {step} is not supported for {support['model_type']}: {why}")


def format_support(folder: str | Path) -> str:
    support = model_support(folder)
    lines = [f"{folder}: {support['model_type']}"]
    for step, why in support["steps"].items():
        lines.append(f"  {step:<28} {'supported' if why is None else 'not supported: ' + why}")
    lines += [f"  note: {n}" for n in support["notes"]]
    return "\n".join(lines)
