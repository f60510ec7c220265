"""Generated bad inputs (hypothesis, seeded and bounded): data files, TOFU folders, safetensors headers,
sharded indexes, importance files and LoRA adapter configs. Each must either load or be refused with a
PertaError naming the file; never another exception, and nothing is written (inputs byte-identical, no
new files, no output)."""
import json
import struct
from dataclasses import astuple

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

from helpers import random_tensors, tree_digest, write_checkpoint
from perta_fast.data import ROW_KINDS, Chat, EvalQA, load_qa
from perta_fast.errors import PertaError
from perta_fast.eval import tofu_splits
from perta_fast.io import Checkpoint
from perta_fast.lora import read_adapter
from perta_fast.merge import MergeOptions, merge

CASES = 300
FUZZ = settings(max_examples=CASES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
ROW_KEYS = ["question", "answer", "paraphrased_answer", "perturbed_answer", "data", "rows", "prompt", "completion",
            "messages", "text", "role", "content"]
rows = st.lists(st.dictionaries(st.sampled_from(ROW_KEYS), scalars | st.lists(scalars, max_size=3) | st.text(),
                                max_size=5) | json_values, max_size=5)
documents = (rows.map(json.dumps) | json_values.map(json.dumps) | rows.map(lambda r: json.dumps({"data": r}))
             | rows.map(lambda r: "\n".join(json.dumps(x) for x in r)))


def _encoded(text_or_bytes, cut):
    raw = text_or_bytes.encode("utf-8", "surrogatepass") if isinstance(text_or_bytes, str) else text_or_bytes
    return raw[:cut] if cut is not None else raw


def _refused_or_loaded(fn, *args, **kwargs):
    try:
        got = fn(*args, **kwargs)
    except PertaError as e:
        assert str(e) and "\n" not in str(e)
        event(f"{fn.__name__}: refused")
        return None
    event(f"{fn.__name__}: accepted")
    return got


@FUZZ
@given(doc=documents | st.binary(max_size=64), cut=st.none() | st.integers(0, 40),
       suffix=st.sampled_from([".json", ".jsonl", ".txt", ".csv"]), eval_rows=st.booleans())
def test_data_files(tmp_path_factory, doc, cut, suffix, eval_rows):
    folder = tmp_path_factory.mktemp("data")
    path = folder / f"rows{suffix}"
    path.write_bytes(_encoded(doc, cut))
    before = tree_digest(folder)
    got = _refused_or_loaded(load_qa, path, eval_rows=eval_rows)
    if got is not None:  # one shape per file, every field a non-empty string (a conversation's turns: strings)
        kinds = (EvalQA,) if eval_rows else ROW_KINDS
        assert got and all(isinstance(r, kinds) for r in got) and len({type(r) for r in got}) == 1
        for r in got:
            if isinstance(r, Chat):
                assert all(isinstance(x, str) for turn in r.messages for x in turn)
                assert any(role == "assistant" and content.strip() for role, content in r.messages)
            else:
                assert all(isinstance(v, str) and v.strip() for v in astuple(r) if not isinstance(v, (bool, tuple)))
    assert tree_digest(folder) == before


TOFU_FILES = ["full.json", "forget01_perturbed.json", "retain_perturbed.json", "real_authors_perturbed.json",
              "world_facts_perturbed.json"]
GOOD_ROW = {"question": "q?", "answer": "a.", "paraphrased_answer": "a!", "perturbed_answer": ["b.", "c."]}


@FUZZ
@given(files=st.dictionaries(st.sampled_from(TOFU_FILES), documents | st.just(json.dumps([GOOD_ROW] * 120)),
                             max_size=5),
       split=st.sampled_from(["forget01", "retain99", "forget05", "forget07", "retain_perturbed", "nope"]))
def test_tofu_folders(tmp_path_factory, files, split):
    folder = tmp_path_factory.mktemp("tofu")
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8", errors="surrogatepass")
    before = tree_digest(folder)
    _refused_or_loaded(load_qa, f"{folder}:{split}")
    splits = _refused_or_loaded(tofu_splits, folder, "forget01", 3)
    if splits is not None:
        assert all(rows and len(rows) <= 3 for rows in splits.values())
    assert tree_digest(folder) == before


DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "Q4", "", 7]


def _header_entry():
    shape = st.lists(st.integers(-2, 6), max_size=3) | st.just([2**40, 2**40]) | st.text(max_size=3)
    offsets = st.lists(st.integers(-8, 200) | st.just(2**64 - 1), min_size=0, max_size=3) | st.just("0,8")
    return st.fixed_dictionaries({"dtype": st.sampled_from(DTYPES), "shape": shape, "data_offsets": offsets})


headers = st.dictionaries(st.sampled_from(["a.weight", "b.weight", "__metadata__", "c"]),
                          _header_entry() | json_values, max_size=3)


def _safetensors_bytes(header, declared_len, body_len, tail_cut):
    blob = json.dumps(header).encode()
    n = len(blob) if declared_len is None else declared_len
    raw = struct.pack("<Q", n) + blob + bytes(range(256)) * (body_len // 256 + 1)
    raw = raw[:8 + len(blob) + body_len]
    return raw[:len(raw) - tail_cut] if tail_cut else raw


@FUZZ
@given(header=headers, declared_len=st.none() | st.integers(0, 2**64 - 1) | st.integers(0, 300),
       body_len=st.integers(0, 300), tail_cut=st.integers(0, 12))
def test_safetensors_headers(tmp_path_factory, header, declared_len, body_len, tail_cut):
    folder = tmp_path_factory.mktemp("st")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(_safetensors_bytes(header, declared_len, body_len, tail_cut))
    before = tree_digest(folder)
    ck = _refused_or_loaded(Checkpoint, folder)
    if ck is not None:
        for name in ck.names():
            if _refused_or_loaded(ck.info, name) is not None:
                t = _refused_or_loaded(ck.get, name)
                assert t is None or isinstance(t, torch.Tensor)
    assert tree_digest(folder) == before


@FUZZ
@given(index=st.fixed_dictionaries({"weight_map": st.dictionaries(
           st.text(max_size=6), st.sampled_from(["model-1.safetensors", "missing.safetensors", "../x.safetensors",
                                                 "/etc/passwd", "sub/model-1.safetensors", "a\x00b", ""])
           | json_values, max_size=4) | json_values}) | json_values,
       raw=st.none() | st.text(max_size=20))
def test_sharded_indexes(tmp_path_factory, index, raw):
    folder = tmp_path_factory.mktemp("idx")
    write_checkpoint(folder, random_tensors({"a.weight": (4, 3)}), shards=1, config={"model_type": "llama"})
    (folder / "model.safetensors").rename(folder / "model-1.safetensors")
    (folder / "model.safetensors.index.json").write_text(raw if raw is not None else json.dumps(index),
                                                          errors="surrogatepass")
    before = tree_digest(folder)
    ck = _refused_or_loaded(Checkpoint, folder)
    if ck is not None:
        assert all(isinstance(ck.get(n), torch.Tensor) for n in ck.names())
    assert tree_digest(folder) == before


SHAPES = {"a.weight": (6, 4), "b.weight": (5,)}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base = random_tensors(SHAPES, seed=0)
    write_checkpoint(root / "full", base)
    write_checkpoint(root / "ft", {n: t + 1 for n, t in base.items()})
    return root


VALID_IMPORTANCE = {f"{kind}/{n}": (shape, torch.float32, "normal") for n, shape in SHAPES.items()
                    for kind in ("forget", "retain")}
# a valid file, then a few changes: a key dropped or added, another shape or dtype, special values
importance_files = st.lists(st.tuples(
    st.sampled_from(sorted(VALID_IMPORTANCE) + ["weight/a.weight", "weight/b.weight", "forget/zzz", "other"]),
    st.none() | st.tuples(st.sampled_from([(6, 4), (5,), (4, 6), (0,), (6, 4, 1)]),
                          st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.float64]),
                          st.sampled_from(["normal", "negative", "nan", "inf", "zero"]))), max_size=3).map(
    lambda changes: {k: v for k, v in {**VALID_IMPORTANCE, **dict(changes)}.items() if v is not None})


@FUZZ
@given(tensors=importance_files,
       metadata=st.lists(st.tuples(st.sampled_from(["method", "n_forget", "n_retain", "write", "alpha", "x"]),
                                   st.none() | st.text(max_size=8)), max_size=2).map(
           lambda changes: {k: v for k, v in {"method": "grad", "n_forget": "4", "n_retain": "8", **dict(changes)}.items()
                            if v is not None}))
def test_importance_files(pair, tmp_path_factory, tensors, metadata):
    """A fuzzed importance file given to merge: merged (then whole) or refused with nothing at --out."""
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("imp")
    made = {}
    for name, (shape, dtype, kind) in tensors.items():
        t = torch.rand(shape).double()
        t = {"negative": -t, "nan": t * float("nan"), "inf": t + float("inf"), "zero": t * 0}.get(kind, t)
        made[name] = t.to(dtype)
    save_file(made, str(folder / "imp.safetensors"), metadata=metadata)
    before = tree_digest(folder), tree_digest(pair)
    out = folder / "out"
    record = _refused_or_loaded(merge, pair / "full", pair / "ft", out, folder / "imp.safetensors",
                                MergeOptions(method="perta"), progress=False)
    if record is None:
        assert not out.exists() and not [p for p in folder.iterdir() if p.name.startswith(".out")]
    else:
        assert Checkpoint(out).names()
        shutil.rmtree(out)
    assert (tree_digest(folder), tree_digest(pair)) == before


ADAPTER_KEYS = ["peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "fan_in_fan_out", "use_dora",
                "modules_to_save", "bias", "base_model_name_or_path", "layers_to_transform", "rank_pattern"]


VALID_ADAPTER = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["a"]}
VALID_FACTORS = {"base_model.model.a.lora_A.weight": (2, 4), "base_model.model.a.lora_B.weight": (6, 2)}


@FUZZ
@given(config=st.lists(st.tuples(st.sampled_from(ADAPTER_KEYS), st.none() | json_values |
                                 st.sampled_from(["LORA", "PREFIX", 4, 8.0, 0, -1, True])), max_size=3).map(
           lambda changes: {k: v for k, v in {**VALID_ADAPTER, **dict(changes)}.items() if v is not None})
       | json_values,
       factors=st.lists(st.tuples(st.sampled_from(sorted(VALID_FACTORS) + ["base_model.model.a.base_layer.weight",
                                                                          "base_model.model.b.lora_A.weight", "junk"]),
                                  st.none() | st.sampled_from([(2, 4), (6, 2), (6, 4), (3, 4), (2, 2), (0, 4)])),
                        max_size=2).map(lambda changes: {k: v for k, v in {**VALID_FACTORS, **dict(changes)}.items()
                                                         if v is not None}))
def test_adapter_configs(pair, tmp_path_factory, config, factors):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("adapter")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: torch.rand(s) for k, s in factors.items()}, str(folder / "adapter_model.safetensors"))
    before = tree_digest(folder)
    _refused_or_loaded(read_adapter, folder, Checkpoint(pair / "full"))
    assert tree_digest(folder) == before
