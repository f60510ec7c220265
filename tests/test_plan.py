"""`perta-fast plan`: parameter counts against the models transformers and peft build, and predicted peaks
against peaks measured (RssAnon, each step in a fresh process) on a small Llama."""
import json

import pytest
import torch

from perta_fast.cli import main
from perta_fast.plan import RUNTIME_HOST_BYTES, Shapes, activations, audit_bytes, logits_bytes, plan_steps


def llama(tmp_path, tokenizer, name="m", **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
               num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=2,
               bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg))  # the vocabulary is wider than the tokenizer's ids: logits are full width
    model.save_pretrained(tmp_path / name)
    tokenizer.save_pretrained(tmp_path / name)
    return tmp_path / name, model


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False, "head_dim": 32},
                                       {"num_key_value_heads": 8, "intermediate_size": 700}])
def test_parameter_counts_match_the_models_built(tmp_path, tiny_tokenizer, overrides):
    from peft import LoraConfig, get_peft_model

    folder, model = llama(tmp_path, tiny_tokenizer, num_hidden_layers=2, vocab_size=400, **overrides)
    shapes = Shapes.from_config(json.loads((folder / "config.json").read_text()), folder)
    assert shapes.params == sum(p.numel() for p in model.parameters())
    for targets in (None, ["q_proj", "down_proj"]):
        peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets or "all-linear"))
        trainable, _ = peft_model.get_nb_trainable_parameters()
        assert shapes.lora_params(8, targets) == trainable
        model = peft_model.unload()


CASES = [("finetune", "fp32", {}), ("finetune", "fp32", {"lora_rank": 8}), ("finetune", "bf16", {"lora_rank": 8}),
         ("finetune", "bf16", {}),  # fp32 master weights of bf16 ones
         ("importance", "fp32", {"method": "fisher"}),
         # 64 rows at once: activations are over a third of the peak, so the plan cannot drop them and pass
         ("importance", "fp32", {"method": "fisher", "rows": 64, "batch_size": 64}),
         # 128 rows fill a forward's answer-token bound, the plan's
         ("quick-eval", "fp32", {"rows": 128}), ("quick-eval", "bf16", {"rows": 128}),
         # 64 samples a batch: the logits (token attacks) or the backward (gradnorm) outweigh the weights
         ("audit", "fp32", {"attacks": "loss,minkpp", "rows": 128, "batch_size": 64}),
         ("audit", "fp32", {"attacks": "gradnorm", "rows": 128, "batch_size": 64})]


@pytest.mark.parametrize("step,dtype,opts", CASES)
def test_plan_within_25_percent_of_measured_peak(tmp_path, tiny_tokenizer, facts, step, dtype, opts):
    """Each step in a fresh process; peak private memory plus mapped file pages (the weights, where the
    checkpoint is mapped rather than copied) above the runtime's own, against the plan. glibc is told to
    map every allocation over 128 KiB on its own, so private memory follows the live tensors the plan
    counts; with its default, freed activations under its adaptive threshold stay on the heap (with this
    model's sub-MiB activations the plan came to 0.68-0.74 of a LoRA step; benchmarks/plan.py measures both).
    The batch is padded to the longest row, which the plan is given as --max-length."""
    from perta_fast.data import encode
    from perta_fast.profiling import measure_step_in_subprocess

    folder, model = llama(tmp_path, tiny_tokenizer, dtype="float32")
    if dtype == "bf16":
        model.to(torch.bfloat16).save_pretrained(folder)
    del model
    rows = (facts[0] + facts[1])[:16]  # measure_step repeats them past the 40 facts when opts ask for more
    length = max(len(e.input_ids) for e in encode(tiny_tokenizer, rows))
    options = {"batch_size": 8, "max_length": length, "epochs": 2, "rows": 16, **opts}
    measured = measure_step_in_subprocess(step, folder, tmp_path / "out", options)["held_bytes"]
    plan = plan_steps(folder, opts.get("lora_rank"), "all-linear", "auto", opts.get("method", "fisher"),
                      options["batch_size"], length)
    key = {"finetune": "finetune (LoRA)" if "lora_rank" in opts else "finetune (full)",
           "importance": f"importance ({opts.get('method')})", "quick-eval": "quick eval", "audit": "audit"}[step]
    predicted = plan["steps"][key][0]
    if step == "audit" and "gradnorm" not in opts["attacks"]:  # the token attacks' phase alone
        predicted = 4 * plan["params"] + audit_bytes(plan["shapes"], 4, options["batch_size"], length,
                                                     plan["shapes"].widest(None, False))[0]
    assert 0.75 <= predicted / measured <= 1.25, (predicted / 1e6, measured / 1e6)


@pytest.mark.parametrize("layers,batch,end_larger", [(8, 8, False), (1, 1, True)])
def test_mean_gradient_plan_counts_the_tied_embedding_at_its_moment(tmp_path, tiny_tokenizer, facts, layers, batch,
                                                                    end_larger):
    """Mean-gradient importance of a tied Llama: the output layer's part of the shared gradient is held
    beside the activations, and at the end of the backward, with the activations gone, autograd holds it,
    the lookup's part and their sum. At 8 layers and batch 8 the activations' moment is the peak (counting
    the three copies beside the activations predicted 1.21 of it); at 1 layer and batch 1 the end is. Within
    15 %: the two moments differ by more than that here."""
    from perta_fast.data import encode
    from perta_fast.profiling import measure_step_in_subprocess

    folder, model = llama(tmp_path, tiny_tokenizer, dtype="float32", num_hidden_layers=layers)
    del model
    rows = (facts[0] + facts[1])[:16]  # measure_step repeats them past the 40 facts when opts ask for more
    length = max(len(e.input_ids) for e in encode(tiny_tokenizer, rows))
    measured = measure_step_in_subprocess("importance", folder, tmp_path / "out", {
        "batch_size": batch, "max_length": length, "rows": 16, "method": "grad"})["held_bytes"]
    plan = plan_steps(folder, None, "all-linear", "auto", "grad", batch, length)
    s, tokens = plan["shapes"], batch * length
    beside_activations = activations(s, tokens, 4, False) + logits_bytes(s, tokens, 4, True) + 4 * s.vocab * s.hidden
    assert (3 * 4 * s.vocab * s.hidden > beside_activations) == end_larger  # the case is the moment it names
    predicted = plan["steps"]["importance (grad)"][0]
    assert 0.85 <= predicted / measured <= 1.15, (predicted / 1e6, measured / 1e6)


@pytest.mark.parametrize("phase,rows,batch,new_tokens,kv_heads,head_dim", [("scoring", 128, 64, 0, 4, 64),
                                                                            ("decoding", 64, 64, 200, 8, 128)])
def test_tofu_eval_plan_within_25_percent_of_measured_peak(tmp_path, tiny_tokenizer, facts, phase, rows, batch,
                                                           new_tokens, kv_heads, head_dim):
    """`perta-fast eval`'s scoring and decoding (the facts repeated to `rows` questions), each phase where
    it is the larger. Scoring: 128 questions fill a forward's 1024 answer tokens, the plan's bound. Decoding:
    at random weights no answer agrees with its first scored one or ends, so all 64 are decoded to 200
    new tokens and the decode cache doubles twice; a continuation holds its prompt alone, so the plan's C
    (--max-length: prompt and agreed answer) is the longest prompt. Wide heads make the decode cache
    outweigh the scoring bounds twice over, so that the check is on decoding's formula."""
    from perta_fast.data import encode
    from perta_fast.plan import tofu_eval_bytes
    from perta_fast.profiling import measure_step_in_subprocess

    folder, model = llama(tmp_path, tiny_tokenizer, dtype="float32", num_key_value_heads=kv_heads, head_dim=head_dim)
    del model
    length = max(e.n_prompt for e in encode(tiny_tokenizer, facts[0] + facts[1]))
    measured = measure_step_in_subprocess("eval", folder, tmp_path / "out", {"rows": rows, "batch_size": batch,
                                                                           "max_new_tokens": new_tokens})
    plan = plan_steps(folder, None, "all-linear", "auto", "fisher", 8, length, eval_batch=batch,
                      max_new_tokens=new_tokens)
    shapes = plan["shapes"]
    if phase == "decoding":  # the case measures what it says: the plan's decoding outweighs its scoring
        assert tofu_eval_bytes(shapes, 4, length, batch, new_tokens) > 2 * tofu_eval_bytes(shapes, 4, length, batch, 0)
    predicted = plan["steps"]["eval (TOFU)"][0]
    assert 0.75 <= predicted / measured["held_bytes"] <= 1.25, (predicted / 1e6, measured["held_bytes"] / 1e6)


@pytest.mark.parametrize("phase,rows,batch,generate,wide", [
    ("scoring", 256, 8, False, {}),
    ("decoding", 512, 256, True, {"num_key_value_heads": 8, "head_dim": 128, "vocab_size": 4096, "num_hidden_layers": 4})])
def test_calibrate_plan_within_25_percent_of_measured_private_peak(tmp_path, tiny_tokenizer, facts, phase, rows, batch,
                                                                   generate, wide):
    """calibrate writes each merged tensor into the loaded model, so the weights become private memory
    (copy-on-write of the mapped checkpoint): RssAnon, not mapped pages, is its footprint. The executor's
    inputs (θ_full's and θ_ft's files) are mapped page cache on top, which the kernel can drop. 128 rows a
    set fill a scoring forward's answer-token bound, which the plan assumes. Decoding: exact match, 32 new
    tokens (at random weights none ends early), 256 questions of a set decoded together, wide heads and a
    narrow vocabulary: the decode cache outweighs the scoring forward's bound by enough that the scoring
    alone would predict under 0.75 of the peak."""
    from perta_fast.data import encode
    from perta_fast.plan import EXACT_MATCH_TOKENS, decoding_bytes
    from perta_fast.profiling import measure_step_in_subprocess

    folder, model = llama(tmp_path, tiny_tokenizer, dtype="float32", **wide)
    finetuned, _ = llama(tmp_path, tiny_tokenizer, name="ft", dtype="float32", **wide)
    with torch.no_grad():  # another θ_ft: a τ that moves every tensor
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(finetuned)
    del model
    encoded = encode(tiny_tokenizer, (facts[0] + facts[1])[:16])
    length, prompts = max(len(e.input_ids) for e in encoded), max(e.n_prompt for e in encoded)
    measured = measure_step_in_subprocess("calibrate", folder, tmp_path / "out",  # every λ peaks alike: one
                                          {"batch_size": batch, "rows": rows, "finetuned": str(finetuned),
                                           "generate": generate, "lams": [1.0], "bisect": 0})
    plan = plan_steps(folder, None, "all-linear", "auto", "fisher", 8, length, calibrate_batch=batch,
                      exact_match=generate, prompt_length=prompts)
    scoring = plan["steps"]["quick eval"][0] - 4 * plan["params"]
    if phase == "decoding":  # the case measures what it says: the plan's decoding outweighs its scoring
        assert decoding_bytes(plan["shapes"], 4, prompts, batch, EXACT_MATCH_TOKENS) > 2 * scoring
    predicted = plan["steps"]["calibrate"][0]
    assert 0.75 <= predicted / measured["peak_bytes"] <= 1.25, (predicted / 1e6, measured["peak_bytes"] / 1e6)


def test_cli_plan_says_what_fits(tmp_path, capsys):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["plan", "--model", str(tmp_path), "--lora-rank", "16", "--memory", "40GB",
                 "--gradient-checkpointing"]) == 0
    text = capsys.readouterr().out
    assert "8.03 B parameters" in text  # Llama-3.1-8B's published count
    lines = {line.split()[0] + line.split()[1]: line for line in text.splitlines()[1:5]}
    assert "does not fit" not in lines["finetune(LoRA)"] and " fits" in lines["finetune(LoRA)"]
    assert main(["plan", "--model", str(tmp_path), "--memory", "40GB"]) == 0
    assert "does not fit" in next(l for l in capsys.readouterr().out.splitlines() if "finetune (full)" in l)
    # TOFU's evaluation and calibrate's exact match, 128 questions decoded together, do not fit 24 GB (the
    # decode cache); each hint's batch does, and one question more does not
    assert main(["plan", "--model", str(tmp_path), "--memory", "24GB"]) == 0
    text = capsys.readouterr().out
    for step, command, knob in (("eval (TOFU)", "eval", "eval_batch"), ("calibrate", "calibrate", "calibrate_batch")):
        line = next(l for l in text.splitlines() if l.strip().startswith(step))
        assert "does not fit" in line and f"{command} --batch-size " in line
        fits = int(line.split(f"{command} --batch-size ")[1].split()[0])

        def gb(batch):
            return (plan_steps(tmp_path, device="cuda", **{knob: batch})["steps"][step][0] + RUNTIME_HOST_BYTES) / 1e9

        assert 1 <= fits < 128 and gb(fits) <= 24 < gb(fits + 1), step


def test_cli_plan_bad_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["plan", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path / "config.json") in err and "lacks a decoder's sizes" in err and len(err.splitlines()) == 1
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 100, "hidden_size": 8, "intermediate_size": 16,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2}))
    assert main(["plan", "--model", str(tmp_path), "--memory", "lots"]) == 2
    assert "--memory 'lots'" in capsys.readouterr().err


def test_plan_constants_mirror_the_code():
    """plan.py reads no torch (it must stay instant): its copies of the chunk sizes must match the code's."""
    from perta_fast import eval as ev, loss, ops, plan, scoring
    from perta_fast.calibration import CalibrateOptions

    assert plan.LOSS_CHUNK_BYTES == loss.CHUNK_BYTES
    assert plan.CHUNK_ELEMENTS == ops.CHUNK_ELEMENTS
    assert (plan.ANSWER_TOKENS_PER_FORWARD, plan.CONTEXT_TOKENS_PER_FORWARD, plan.GENERATE_BATCH, plan.DECODE_ROOM) == (
        scoring.ANSWER_TOKENS_PER_FORWARD, scoring.CONTEXT_TOKENS_PER_FORWARD, scoring.GENERATE_BATCH, scoring.ROOM)
    assert plan.MAX_NEW_TOKENS == ev.EvalOptions().max_new_tokens
    assert plan.EXACT_MATCH_TOKENS == CalibrateOptions().max_new_tokens
    assert plan.GENERATE_BATCH == CalibrateOptions().batch_size
    from perta_fast import audit

    assert plan.POSITIONS_PER_SOFTMAX == audit.POSITIONS_PER_SOFTMAX


def test_plan_offers_host_accumulators_where_a_gpu_needs_groups(tmp_path):
    """Llama-3.1-8B on a 40 GB GPU at batch 1: importance needs parameter groups on the device; with the
    accumulators in host memory the GPU holds one parameter's fp32 buffer (the 128256 × 4096 lm_head,
    the largest) in place of a group's."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    result = plan_steps(tmp_path, method="fisher", batch_size=1, max_length=512, checkpointing=True, memory_gb=40,
                        device="cuda")
    steps, groups = result["steps"], result["groups"]
    assert groups == 2
    grouped, host = steps["importance (fisher)"][0], steps["importance (fisher, host)"][0]
    assert grouped - host == 4 * -(-result["params"] // groups) - 4 * 128256 * 4096
    assert "32.1 GB fp32 accumulators in host memory" in steps["importance (fisher, host)"][1]
    on_cpu = plan_steps(tmp_path, method="fisher", batch_size=1, max_length=512, checkpointing=True, memory_gb=40)
    assert "importance (fisher, host)" not in on_cpu["steps"]  # on the CPU the host is the device



def test_bf16_autocast_plan_adds_the_measured_weight_copies(tmp_path, tiny_tokenizer):
    """eval --bf16-autocast over fp32 weights: torch's autocast keeps a bf16 copy of every weight that requires
    grad until its context exits, and evaluate_splits scores under one context. The plan's extra (2·P) against the
    measured difference between scoring with and without autocast, same model and rows (few: the activations
    are small beside the copies, and a CPU that emulates bf16 stays quick)."""
    from perta_fast.profiling import measure_step_in_subprocess

    folder, model = llama(tmp_path, tiny_tokenizer, dtype="float32", num_hidden_layers=4)
    del model
    held = {on: measure_step_in_subprocess("eval", folder, tmp_path / f"out{on}", {
        "rows": 8, "batch_size": 8, "max_new_tokens": 0, "bf16_autocast": on})["held_bytes"] for on in (False, True)}
    plan = {on: plan_steps(folder, max_length=64, bf16_autocast=on)["steps"]["eval (TOFU)"][0] for on in (False, True)}
    measured, predicted = held[True] - held[False], plan[True] - plan[False]
    assert 0.8 <= predicted / measured <= 1.25, (predicted / 1e6, measured / 1e6)


def test_cli_plan_counts_text_windows_and_rows_as_training_cuts_them(tmp_path, tiny_dir, tiny_tokenizer, capsys):
    texts = ["alpha beta gamma delta " * n for n in (3, 11, 40)]
    (tmp_path / "docs.json").write_text(json.dumps(texts))
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"a {i}"}) + "\n"
                                               for i in range(5)))
    max_length, batch = 16, 2
    assert main(["plan", "--model", str(tiny_dir), "--forget", str(tmp_path / "docs.json"), "--retain",
                 str(tmp_path / "qa.jsonl"), "--max-length", str(max_length), "--batch-size", str(batch)]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[-2:]}
    bos = int(tiny_tokenizer.bos_token_id is not None and tiny_tokenizer("a")["input_ids"][0] == tiny_tokenizer.bos_token_id)
    samples = scored = 0
    for t in texts:  # windows of max_length tokens, a BOS first where used, each scoring all but its first token
        n = len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"])
        chunks = [min(max_length - bos, n - k) for k in range(0, n, max_length - bos)]
        kept = [c for c in chunks if bos + c >= 2]
        samples, scored = samples + len(kept), scored + sum(bos + c - 1 for c in kept)
    forget = lines["forget"]
    assert forget[1] == "text" and forget[3] == "3" and int(forget[5]) == samples and samples > 3
    assert int(forget[8].replace(",", "")) == scored and int(forget[-1]) == -(-samples // batch)
    assert lines["retain"][1] == "question/answer" and lines["retain"][3] == lines["retain"][5] == "5"
    # bad data is refused before anything is printed
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert main(["plan", "--model", str(tiny_dir), "--forget", str(tmp_path / "bad.jsonl")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "bad.jsonl" in err and len(err.strip().splitlines()) == 1
