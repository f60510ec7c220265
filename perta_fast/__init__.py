"""perta-fast: make a fine-tuned LLM forget chosen data by per-parameter task arithmetic (PerTA).

The public API is imported lazily so that `import perta_fast` (and the merge path) stays free of
transformers until a function that needs it is called.
"""
__version__ = "0.1.0"

_API = {
    "PertaError": "errors",
    "Checkpoint": "io",
    "merge": "merge", "plan_merge": "merge", "execute_merge": "merge", "MergeOptions": "merge",
    "ratio_weights": "merge", "merge_tensor": "merge",
    "QA": "data", "load_qa": "data",
    "make_facts": "facts",
    "load_model": "models", "convert_gguf": "models", "default_model": "models",
    "finetune": "train", "FinetuneOptions": "train",
    "compute_importance": "importance", "save_importance": "importance", "estimate_importance": "importance",
    "evaluate": "eval",
    "unlearn": "pipeline", "demo": "pipeline",
}

__all__ = ["__version__", *_API]


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'perta_fast' has no attribute {name!r}")
