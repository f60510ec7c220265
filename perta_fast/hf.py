"""Every use of transformers' internals (anything beyond from_pretrained, save_pretrained and calling a model)
in one place, so that a transformers release that changes them is this file's work.

Checked against transformers 5.25.0 (CHECKED_WITH: update it when you check this file against a newer release);
the floor is TRANSFORMERS_MIN. transformers itself is imported lazily: the merge path never loads it.
"""
from __future__ import annotations

import inspect
import re

from .errors import PertaError

CHECKED_WITH = "5.25.0"
# from_pretrained(dtype=...) and GradientCheckpointingLayer are from transformers 4.56; an older one would
# take dtype= as a config attribute and silently load fp32. pyproject's floor (tests/test_versions.py).
TRANSFORMERS_MIN = (4, 56)


def require_transformers() -> None:
    """A one-line error, not a wrong dtype or an AttributeError deep inside, with too old a transformers."""
    try:
        import transformers
    except ImportError as e:  # e.g. transformers' own check of the tokenizers version it needs
        raise PertaError(f"cannot import transformers ({str(e).splitlines()[0]})") from None

    found = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    if found < TRANSFORMERS_MIN:
        need = ".".join(map(str, TRANSFORMERS_MIN))
        raise PertaError(f"transformers {transformers.__version__} is too old: perta-fast needs {need} or newer "
                         f"(pip install \"transformers>={need}\")")


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def quiet_progress_bars() -> None:
    """transformers draws a bar per load and save; ours already show the progress that matters."""
    require_transformers()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# ---------------------------------------------------------------- gradient checkpointing

def enable_checkpointing(model) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations. transformers
    checkpoints a layer only while that layer is in training mode; setting the flag on the layers
    alone leaves dropout inside them as the caller set it (off for importance and evaluation)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise PertaError(f"{type(model).__name__} does not support gradient checkpointing")
    if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5 (the old one warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer):
            m.train = _layer_train.__get__(m)  # keeps .training True however the model's mode changes
            m.training = True


def _layer_train(self, mode: bool = True):
    for child in self.children():
        child.train(mode)
    return self


# ---------------------------------------------------------------- norms (the exact Fisher's hooks)

def is_rms_norm(m) -> bool:
    """transformers has one RMSNorm class per architecture (LlamaRMSNorm, Qwen2RMSNorm, …), none a common
    base: recognised by name, with a 1-D weight and no bias."""
    from torch import nn

    return "RMSNorm" in type(m).__name__ and isinstance(getattr(m, "weight", None), nn.Parameter) \
        and m.weight.dim() == 1 and not isinstance(getattr(m, "bias", None), nn.Parameter)


def embedding_scale(m) -> float | None:
    """The factor an embedding module multiplies its lookup by, in the weight's dtype: 1 for a plain
    nn.Embedding; `embed_scale` for transformers' ScaledWordEmbedding classes (Gemma 2 and 3: √hidden, 48 for
    Gemma-2-2B); None for any other forward, whose per-sample gradient is not known here."""
    import torch
    from torch import nn

    if type(m).forward is nn.Embedding.forward:
        return 1.0
    if _scaled_embedding(m):
        return float(torch.as_tensor(m.embed_scale).to(m.weight.dtype))
    return None


def known_embedding(m) -> bool:
    """Whether embedding_scale knows this embedding's forward (asked of a model on the meta device, too)."""
    from torch import nn

    return type(m).forward is nn.Embedding.forward or _scaled_embedding(m)


def _scaled_embedding(m) -> bool:
    return type(m).__name__.endswith("ScaledWordEmbedding") and hasattr(m, "embed_scale")


def is_conv1d(m) -> bool:
    """transformers' Conv1D (GPT-2 and its kind): a Linear whose stored weight is (in, out), y = x·W + b."""
    return type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None and m.weight.dim() == 2


def rms_eps(m) -> float:
    return float(getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6)))


# ---------------------------------------------------------------- KV caches (the scorer and decoder)

def forward(model, cache=None, **inputs):
    """model(**inputs) with a KV cache: transformers 5 calls the argument `cache`, 4.x `past_key_values`."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(**inputs, **{name: cache})


def cache_of(out):
    return out.cache if "cache" in out else out.past_key_values


def cache_from(layers):
    """A DynamicCache holding the given (keys, values) per layer."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def roomy_cache(buffers, most: int):
    """A DynamicCache over per-layer (keys, values, length) buffers with room beyond `length`, so that a
    decode step writes its token in place: transformers' DynamicLayer concatenates, copying the whole cache
    at every step (12 % of a batch-64 decode step on a 2-core CPU, measured). It never grows past `most`
    tokens (those decoding can reach): a doubling past them would be memory allocated and never written."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layers = [roomy_layer_class()(k, v, n, most) for k, v, n in buffers]
    return cache


def with_room(keys, values, room: int):
    """(keys, values) copied into buffers with `room` more tokens: one layer of roomy_cache's input."""
    shape = (*keys.shape[:2], keys.shape[2] + room, keys.shape[3])
    k, v = keys.new_empty(shape), values.new_empty(shape)
    k[:, :, :keys.shape[2]], v[:, :, :keys.shape[2]] = keys, values
    return k, v, keys.shape[2]


_ROOMY = None


def roomy_layer_class():
    """A DynamicLayer that writes into preallocated room (made once: the class needs transformers)."""
    global _ROOMY
    if _ROOMY is None:
        from transformers.cache_utils import DynamicLayer

        class RoomyLayer(DynamicLayer):
            def __init__(self, room_k, room_v, length, most):
                super().__init__()
                self.room_k, self.room_v, self.length, self.most = room_k, room_v, length, most
                self.dtype, self.device, self.is_initialized = room_k.dtype, room_k.device, True
                self._views()

            def _views(self):
                self.keys, self.values = self.room_k[:, :, :self.length], self.room_v[:, :, :self.length]

            def update(self, key_states, value_states, *args, **kwargs):
                n = key_states.shape[2]
                if self.length + n > self.room_k.shape[2]:  # out of room: twice the tokens, up to `most`
                    room = max(n, min(self.length + n, self.most - self.length))
                    self.room_k, self.room_v, _ = with_room(self.keys, self.values, room)
                self.room_k[:, :, self.length:self.length + n] = key_states
                self.room_v[:, :, self.length:self.length + n] = value_states
                self.length += n
                self._views()
                return self.keys, self.values

            def batch_select_indices(self, indices):
                self.room_k, self.room_v = self.room_k[indices], self.room_v[indices]
                self._views()

        _ROOMY = RoomyLayer
    return _ROOMY


# ---------------------------------------------------------------- module names vs stored names

def meta_model(config: dict, path):
    """The causal LM a config describes, built on the meta device: every parameter's name and shape, no memory
    (Mixtral-8x7B in about a second)."""
    import torch

    require_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    if not config.get("model_type"):
        raise PertaError(f"{path}: no model_type, so transformers cannot tell the architecture")
    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.get("model_type"), **fields))
    except Exception as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise PertaError(f"{path}: transformers cannot build a causal LM from this config "
                         f"({why[:200] + '…' if len(why) > 200 else why})") from None


def _reversal():
    """transformers 5's reversal of its load conversion; None before 5 (no conversion: a parameter's module name
    is its stored name)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None
    return revert_weight_conversion


def stored_layout(model, names) -> dict[str, dict[str, tuple[int, ...]]]:
    """module parameter name -> {stored name: shape}: where the parameter is kept in the checkpoint files.
    transformers 5 loads some architectures through a conversion (GPT-NeoX's embed_out is the module's lm_head;
    a MoE layer's experts, stored one tensor per expert and projection, are one fused parameter) and writes the
    stored layout back on save with its own reversal (`revert_weight_conversion`), which is asked here on
    shapes alone (the meta device): no memory, whatever the model's size."""
    import torch

    params = dict(model.named_parameters())
    revert_weight_conversion = _reversal()
    if revert_weight_conversion is None:
        return {name: {name: tuple(params[name].shape)} for name in names}
    return {name: {stored: tuple(t.shape) for stored, t in
                   revert_weight_conversion(model, {name: torch.empty(params[name].shape, device="meta")}).items()}
            for name in names}


def renamed_to(model, name: str, shape) -> str | None:
    """The stored name of a parameter transformers keeps whole under another name (or its own), else None (its
    elements are rearranged on save: element_places says where)."""
    import torch

    revert_weight_conversion = _reversal()
    if revert_weight_conversion is None:
        return name
    probe = torch.empty(shape, device="meta")
    moved = revert_weight_conversion(model, {name: probe})
    return next(iter(moved)) if len(moved) == 1 and next(iter(moved.values())) is probe else None


def element_places(model, name: str, shape) -> dict:
    """stored name -> the index, into the flattened parameter, of each element of that stored tensor (its shape):
    the reversal applied to the element numbers (int32 where they fit, 4 bytes per element held while they are).
    Refused unless every element lands exactly once: a conversion that combined elements would leave a
    per-element score, or a merged value, no single place."""
    import torch

    revert_weight_conversion = _reversal()
    numel = torch.Size(shape).numel()
    numbers = torch.arange(numel, dtype=torch.int64 if numel >= 2 ** 31 else torch.int32)
    pieces = revert_weight_conversion(model, {name: numbers.reshape(shape)})
    seen = torch.zeros(numel, dtype=torch.uint8)
    for index in pieces.values():
        seen[index.flatten()] += 1
    if sum(i.numel() for i in pieces.values()) != numel or not bool((seen == 1).all()):
        raise PertaError(f"{name}: transformers stores this parameter through a conversion that does not keep each "
                         "element apart; its per-element values have no single stored place")
    return pieces


def to_stored(model, name: str, scores) -> dict:
    """A module parameter's per-element scores under their stored names: a renamed parameter's are the same tensor."""
    only = renamed_to(model, name, scores.shape)
    if only is not None:
        return {only: scores}
    flat = scores.flatten()
    return {stored: flat[index] for stored, index in element_places(model, name, scores.shape).items()}
