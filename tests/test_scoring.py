"""The scoring engine against independent computations on a tiny model: every NLL against its own unpadded
sequence (a log-softmax written out in float64), extraction strength against greedy generation from every
prefix, greedy answers against transformers' `generate` on each question alone."""
import random
from types import SimpleNamespace

import pytest
import torch

from perta_fast import hf
from perta_fast import scoring as sc
from perta_fast.data import QA, encode, prompt_and_answer
from perta_fast.models import load_model

from helpers import nll_by_hand


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir, "cpu")


def tree_items(rows):
    """Questions whose answers share prefixes as TOFU's do (a paraphrase, then the same words with the end
    changed), an exact repeat, an answer that is another's prefix, and unrelated answers."""
    items = []
    for i, r in enumerate(rows):
        a, para = r.answer, r.paraphrased_answer
        items.append((r.question, [a, para, para[:len(para) // 2] + " Smith", para[:len(para) // 2] + " Jones",
                                   a, a[:len(a) // 3], *r.perturbed_answers[:1 + i % 3]]))
    return items


def es_of_one_sequence(model, tok, question, answer):
    """Extraction strength from one unpadded sequence: k = 1 + the last answer position whose argmax misses."""
    e = encode(tok, [QA(question, answer)])[0]
    with torch.no_grad():
        pred = model(input_ids=torch.tensor([e.input_ids])).logits[0].argmax(-1).tolist()
    ans = e.input_ids[e.n_prompt:]
    misses = [j for j, t in enumerate(ans) if pred[e.n_prompt - 1 + j] != t]
    return 1 - (misses[-1] + 1 if misses else 0) / len(ans)


def test_extraction_strength_by_hand():
    # answer 1,2,3,4; teacher-forced argmaxes 5,2,5,4: last miss at index 2 → k = 3
    assert sc.extraction_strength([5, 2, 5, 4], [1, 2, 3, 4]) == 1 - 3 / 4
    assert sc.extraction_strength([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert sc.extraction_strength([1, 2, 3, 0], [1, 2, 3, 4]) == 0.0


def test_answers_become_one_tree():
    tree = sc._tree(0, [9], [[1, 2, 3], [1, 2, 4], [1, 2, 3], [1], [5]])
    assert tree.tokens == [1, 2, 3, 4, 5] and tree.parents == [-1, 0, 1, 1, -1] and tree.depths == [1, 2, 3, 3, 1]
    assert tree.paths == [[0, 1, 2], [0, 1, 3], [0, 1, 2], [0], [4]]


def test_common_prefix_leaves_every_prompt_its_last_token():
    assert sc.common_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert sc.common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert sc.common_prefix([[1, 2], [3, 2]]) == 0


@pytest.mark.parametrize("answer_tokens", [1, 60, 10**6])  # one question per forward, a few, all at once
def test_scores_equal_separate_sequences(tiny, eval_rows, answer_tokens):
    """Prompts of different lengths left-padded after a shared prefix, each question's answers as one tree:
    each NLL equals that of its own unpadded sequence and each extraction strength its own argmaxes'."""
    model, tok = tiny
    items = tree_items(eval_rows[:3] + eval_rows[-3:])
    prompts = [encode(tok, [QA(q, a[0])])[0] for q, a in items]
    assert len({p.n_prompt for p in prompts}) > 1  # prompts really differ in length, so padding is exercised
    trees = [sc._tree(i, [], [x.input_ids[x.n_prompt:] for x in encode(tok, [QA(q, a) for a in ans])])
             for i, (q, ans) in enumerate(items)]
    assert sum(map(len, (t.tokens for t in trees))) < 0.8 * sum(len(p) for t in trees for p in t.paths)  # shared
    assert sc.common_prefix([p.input_ids[:p.n_prompt] for p in prompts]) > 0
    scores = sc.score_questions(model, tok, items, answer_tokens=answer_tokens)
    for (q, answers), s in zip(items, scores, strict=True):
        # fp32 sums in another order: ~1e-7; a tree position off by one, a node seeing its siblings or the
        # prefix hidden fails it (each broken on purpose once)
        assert s.nll == pytest.approx([nll_by_hand(model, tok, q, a) for a in answers], rel=1e-6)
        assert s.extraction == [es_of_one_sequence(model, tok, q, a) for a in answers]
        assert s.greedy is None


def test_answer_probabilities_equal_each_unpadded_sequence(tiny, eval_rows):
    """The quick eval's probabilities (token-tree scorer) and the padded-batch reference both against
    exp(−NLL) of each row's own unpadded sequence in float64: fp32 sums in another order, ~1e-7."""
    from math import exp

    from perta_fast.eval import answer_probabilities, padded_answer_probabilities

    model, tok = tiny
    rows = [QA(r.question, r.answer) for r in eval_rows]
    by_hand = [exp(-nll_by_hand(model, tok, r.question, r.answer)) for r in rows]
    assert answer_probabilities(model, tok, rows) == pytest.approx(by_hand, rel=1e-6)
    assert padded_answer_probabilities(model, tok, rows, batch_size=3) == pytest.approx(by_hand, rel=1e-6)


def test_question_groups_keep_both_budgets():
    """Every question in exactly one group; a group of more than one question keeps questions × (widest tree
    + 1) within the logits budget and questions × (prefix + longest prompt + widest tree) within the KV
    budget: checked by brute force over hand-made shapes, small trees with long prompts included."""
    rng = random.Random(0)
    trees = [SimpleNamespace(prompt=[0] * rng.randint(1, 90), tokens=[0] * rng.randint(1, 200)) for _ in range(200)]
    for prefix, answer_tokens, context_tokens in ((20, 1024, 4096), (0, 300, 10**9), (5, 10**9, 2000), (0, 1, 1)):
        def fits(g):
            nodes, prompt = max(len(trees[i].tokens) for i in g), max(len(trees[i].prompt) for i in g)
            return len(g) * (nodes + 1) <= answer_tokens and len(g) * (prefix + prompt + nodes) <= context_tokens

        groups = sc.question_groups(trees, prefix, answer_tokens, context_tokens)
        assert sorted(i for g in groups for i in g) == list(range(len(trees)))
        assert all(fits(g) for g in groups if len(g) > 1)
        # and no group closed early: the next group's first question would have broken a budget
        assert not any(fits(g + nxt[:1]) for g, nxt in zip(groups, groups[1:]))


@pytest.fixture(scope="module")
def memorised(tiny_dir, eval_rows):
    """The tiny model trained hard on half the rows, so that some answers are extractable."""
    from perta_fast.train import FinetuneOptions, train_in_place

    model, tok = load_model(tiny_dir, "cpu")
    rows = [QA(r.question, r.answer) for r in eval_rows[:8]]
    train_in_place(model, tok, rows, FinetuneOptions(epochs=40, lr=1e-2, batch_size=8))
    return model, tok


def extraction_by_generation(model, tok, question, answer):
    """The definition itself: the shortest answer prefix from which greedy decoding reproduces the rest.
    Decoding is written out (whole sequence each step, no stop token: the answer ends with <|im_end|>\n)."""
    e = encode(tok, [QA(question, answer)])[0]
    ans = e.input_ids[e.n_prompt:]
    for k in range(len(ans)):
        ids = e.input_ids[:e.n_prompt + k]
        with torch.no_grad():
            for _ in range(len(ans) - k):
                ids = ids + [int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
        if ids[e.n_prompt + k:] == ans[k:]:
            return 1 - k / len(ans)
    return 0.0


def test_extraction_strength_matches_greedy_generation_from_each_prefix(memorised, eval_rows):
    model, tok = memorised
    rows = eval_rows[:8] + eval_rows[-3:]
    scores = sc.score_questions(model, tok, [(r.question, [r.answer, r.paraphrased_answer]) for r in rows])
    values = [s.extraction[0] for s in scores]
    for r, value in zip(rows, values):
        assert value == pytest.approx(extraction_by_generation(model, tok, r.question, r.answer)), r.question
    assert len(set(values)) > 2  # the check is not vacuous: trained rows extract, others do not


@pytest.fixture(scope="module")
def transformers_greedy(memorised, eval_rows):
    """transformers' own greedy decoding of each question alone (no padding), 24 new tokens at most."""
    model, tok = memorised
    answers = {}
    for r in eval_rows[:8] + eval_rows[-3:]:
        prompt = tok(prompt_and_answer(tok, r.question)[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        answers[r.question] = out[0, prompt.shape[1]:].tolist()
    return answers


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_batched_greedy_answers_equal_transformers_one_question_at_a_time(memorised, eval_rows, batch_size,
                                                                          transformers_greedy, monkeypatch):
    """From the prompts alone: questions sorted into batches, left-padded, finished answers leaving the batch."""
    model, tok = memorised
    questions = [r.question for r in eval_rows[:8] + eval_rows[-3:]]
    monkeypatch.setattr(sc, "ROOM", 1 if batch_size == 4 else 64)  # and with a cache out of room at once
    got = sc.generate_answers(model, tok, questions, max_new_tokens=24, batch_size=batch_size)
    lengths = set()
    for q, answer in zip(questions, got, strict=True):
        new = transformers_greedy[q]
        lengths.add(len(new))
        assert answer == tok.decode(new, skip_special_tokens=True).strip(), q
    assert len(lengths) > 1  # answers end at different steps, so rows really leave the batch


def test_greedy_decoding_runs_in_fp32_under_autocast(memorised, eval_rows, transformers_greedy):
    """Autocast would re-cast every weight at every step (2.3x slower decoding: benchmarks/decode_autocast.py):
    generation turns it off, so it decodes as fp32 does."""
    model, tok = memorised
    questions = [r.question for r in eval_rows[:8] + eval_rows[-3:]]
    dtypes = set()
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = sc.generate_answers(model, tok, questions, max_new_tokens=24)
    finally:
        hook.remove()
    assert dtypes == {torch.float32}
    assert got == [tok.decode(transformers_greedy[q], skip_special_tokens=True).strip() for q in questions]


@pytest.mark.parametrize("batch_size, max_new_tokens, answer_tokens, room", [
    (1, 24, 10**6, 64), (4, 24, 60, 64), (64, 24, 10**6, 64), (3, 5, 60, 64),
    (4, 24, 60, 1)])  # the decode cache out of room at once: it doubles its buffers as it goes
def test_greedy_answers_continued_from_scoring_equal_transformers(memorised, eval_rows, batch_size, max_new_tokens,
                                                                 answer_tokens, room, transformers_greedy,
                                                                 monkeypatch):
    """Greedy answers started from the first answer's teacher forcing (the memorised rows agree with it to
    their end, the others part from it early) and decoded on from the scored cache, several forwards'
    worth side by side: the tokens equal transformers' own greedy decoding of each question alone."""
    model, tok = memorised
    monkeypatch.setattr(sc, "ROOM", room)
    rows = eval_rows[:8] + eval_rows[-3:]
    items = tree_items(rows)
    scores = sc.score_questions(model, tok, items, generate=max_new_tokens, batch_size=batch_size,
                                answer_tokens=answer_tokens)
    agreed, lengths = set(), set()
    for (q, answers), s in zip(items, scores, strict=True):
        expected = transformers_greedy[q]
        assert s.greedy == expected[:max_new_tokens], q
        first = encode(tok, [QA(q, answers[0])])[0]
        tail = first.input_ids[first.n_prompt:]
        agreed.add(next((j for j, (g, t) in enumerate(zip(expected, tail)) if g != t), len(tail)))
        lengths.add(len(s.greedy))
    # not vacuous: some answers come wholly from teacher forcing, some part from it at once, some later; they
    # end at different steps (rows leave the batch), or the limit cuts them inside the agreeing part
    assert 0 in agreed and len(agreed) > 2
    assert len(lengths) > 1 if max_new_tokens == 24 else max(agreed) > max_new_tokens


def test_a_part_scores_as_it_would_alone(memorised, eval_rows):
    """Splits scored in one call (their greedy answers sharing decode batches) score bit for bit as each
    would alone: a model evaluated against itself gets a KS statistic of exactly 0."""
    model, tok = memorised
    items = tree_items(eval_rows)
    a, b = items[:5], items[5:]
    together = sc.score_questions(model, tok, a + b, generate=12, parts=[len(a), len(b)])
    alone = sc.score_questions(model, tok, a, generate=12) + sc.score_questions(model, tok, b, generate=12)
    assert [(s.nll, s.extraction) for s in together] == [(s.nll, s.extraction) for s in alone]
    assert [s.greedy for s in together] == [s.greedy for s in alone]


@pytest.mark.parametrize("path", ["continued from scoring", "from the prompts"])
def test_decoding_frees_each_cache_it_replaces(memorised, eval_rows, path, monkeypatch):
    """Rows leaving the batch and room running out give the decode cache new tensors; the old ones (and the
    prompts' own cache, once copied) are gone by the next decode step, not held to the end of decoding:
    held, they cost up to 1.75× the decode cache (benchmarks/eval_memory.py)."""
    import weakref

    model, tok = memorised
    monkeypatch.setattr(sc, "ROOM", 1)  # out of room at the first step: every layer swaps its buffers
    layer = hf.roomy_layer_class()
    replaced, checked, swaps = [], [], set()
    select, update, forward, run_prompts = layer.batch_select_indices, layer.update, hf.forward, sc._run_prompts

    def watch_select(self, indices):
        replaced.append(weakref.ref(self.room_k))
        swaps.add("rows left")
        select(self, indices)

    def watch_update(self, key_states, value_states, *args, **kwargs):
        if self.length + key_states.shape[2] > self.room_k.shape[2]:
            replaced.append(weakref.ref(self.room_k))
            swaps.add("out of room")
        return update(self, key_states, value_states, *args, **kwargs)

    def watch_prompts(model, prompts, pad):
        out, mask = run_prompts(model, prompts, pad)
        replaced.extend(weakref.ref(x.keys) for x in hf.cache_of(out).layers)
        return out, mask

    def check_forward(model, cache=None, **inputs):
        if cache is not None:  # a decode step: everything replaced before it must be freed by now
            checked.append(len(replaced))
            assert all(ref() is None for ref in replaced)
        return forward(model, cache, **inputs)

    monkeypatch.setattr(layer, "batch_select_indices", watch_select)
    monkeypatch.setattr(layer, "update", watch_update)
    monkeypatch.setattr(sc, "_run_prompts", watch_prompts)
    monkeypatch.setattr(hf, "forward", check_forward)
    rows = eval_rows[:8] + eval_rows[-3:]
    if path == "continued from scoring":
        sc.score_questions(model, tok, tree_items(rows), generate=24)
    else:
        sc.generate_answers(model, tok, [r.question for r in rows], max_new_tokens=24)
    # not vacuous: both kinds of swap happened, and decode steps ran after them
    assert swaps == {"rows left", "out of room"} and sum(n > 0 for n in checked) > 5
