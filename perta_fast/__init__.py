"""perta-fast: make a fine-tuned LLM forget chosen data by per-parameter task arithmetic (PerTA).

The merge path is imported eagerly (torch and safetensors only); everything that needs
transformers is imported lazily, when a function that needs it is first used.
"""
__version__ = "0.1.0"


def _unshadow_kernels() -> None:
    """Run from a checkout's root (`python -m perta_fast`, `python -m pytest`), the source folder kernels/
    (installed as perta_fast.kernels) would be the top-level `kernels`, a name Hugging Face's package holds
    and transformers >= 5.25 imports: take the checkout's root off sys.path (an installed copy has none)."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "csrc").is_dir() and (root / "kernels").is_dir():
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]


_unshadow_kernels()

# The merge path needs only torch and safetensors, so it is imported eagerly (this also keeps the
# function `merge` from being shadowed by its module); everything that needs transformers is lazy.
from .errors import PertaError  # noqa: E402
from .io import Checkpoint  # noqa: E402
from .merge import MergeOptions, execute_merge, merge, merge_tensor, plan_merge, ratio_weights  # noqa: E402
from .data import QA, load_qa  # noqa: E402

_API = {
    "make_facts": "facts",
    "load_model": "models", "convert_gguf": "models", "default_model": "models",
    "finetune": "train", "FinetuneOptions": "train",
    "importance_file": "importance", "compute_importance": "importance", "save_importance": "importance", "estimate_importance": "importance",
    "evaluate": "eval", "evaluate_tofu": "eval", "eval_checkpoint": "eval", "tofu_splits": "eval",
    "EvalOptions": "eval", "unlearn_by_training": "baselines", "BaselineOptions": "baselines",
    "unlearn": "pipeline", "demo": "pipeline", "UnlearnOptions": "pipeline",
    "calibrate": "calibration", "calibrate_files": "calibration", "CalibrateOptions": "calibration",
}

__all__ = ["__version__", "PertaError", "Checkpoint", "MergeOptions", "execute_merge", "merge",
           "merge_tensor", "plan_merge", "ratio_weights", "QA", "load_qa", *_API]


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'perta_fast' has no attribute {name!r}")
