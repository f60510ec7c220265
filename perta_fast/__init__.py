"""perta-fast: make a fine-tuned LLM forget chosen data by per-parameter task arithmetic (PerTA).

The merge path needs only torch and safetensors, so it is imported eagerly (this also keeps the function
`merge` from being shadowed by its module); the rest of the API is imported when first used.
"""
from ._version import __version__  # noqa: F401
from .errors import PertaError
from .io import Checkpoint
from .merge import MergeOptions, execute_merge, merge, merge_tensor, plan_merge, ratio_weights
from .data import QA, load_qa

_API = {
    "make_facts": "facts",
    "load_model": "models", "convert_gguf": "models", "default_model": "models",
    "finetune": "train", "FinetuneOptions": "train",
    "importance_file": "importance", "compute_importance": "importance", "save_importance": "importance",
    "estimate_importance": "importance", "ImportanceOptions": "options",
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
