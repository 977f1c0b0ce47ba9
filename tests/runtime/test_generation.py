"""Generation with the compiled KV cache: numerics against onnxruntime and PyTorch, sampling, bad input."""

import numpy as np
import pytest

from pbs2pc.errors import Pbs2pcError
from pbs2pc.runtime import SamplingParams, generate as gen, load
from pbs2pc.runtime.reference import OrtDecoder
from pbs2pc.runtime.sampling import Sampler
from testutil import make_ids, ort_logits, rel_err


def test_prefill_returns_the_last_position_of_main(tiny_library):
    model = load(tiny_library)
    ids = make_ids(1, 9, seed=4)
    full = model.logits(ids)[0, -1]
    assert rel_err(model.prefill(ids[0], capacity=16), full) < 1e-6


def test_manifest_describes_the_cache_and_decode_entry(tiny_library):
    model = load(tiny_library)
    assert model.manifest["functions"] == ["main", "decode", "prefill"]
    assert model.manifest["inputs"] == ["input_ids", "attention_mask", "position_ids"]
    assert model.manifest["outputs"] == ["logits"]
    assert model.manifest["kv_cache"]["layers"] == 2 and model.manifest["kv_cache"]["head_dim"] == 16


@pytest.mark.parametrize("prompt_len", [1, 5, 16, 17, 64, 65])
def test_cached_steps_match_full_sequence_logits(tiny_library, tiny_onnx, prompt_len):
    """Prefill ``prompt_len`` tokens, then one token at a time: each position's logits equal onnxruntime's
    logits for the whole sequence (no cache) at that position. Crosses the 64-key block boundary."""
    ids = make_ids(1, 70, seed=prompt_len)
    ref = ort_logits(tiny_onnx, ids)[0]
    model = load(tiny_library)
    got = [model.prefill(ids[0, :prompt_len], capacity=70)]
    got += [model.step(int(t)) for t in ids[0, prompt_len:]]
    assert rel_err(np.stack(got), ref[prompt_len - 1:]) < 1e-5


def test_greedy_tokens_match_pytorch_and_onnxruntime(tiny_library, tiny_onnx, tiny_compressed):
    from pbs2pc.models.evaluate import TorchDecoder

    compiled, ort, torch_model = load(tiny_library), OrtDecoder(tiny_onnx), TorchDecoder(tiny_compressed[0])
    for seed in range(3):
        prompt = make_ids(1, 3 + seed, seed=10 + seed)[0]
        runs = [gen.generate(d, prompt, 24).token_ids for d in (compiled, ort, torch_model)]
        assert runs[0] == runs[1] == runs[2] and len(runs[0]) == 24


def test_batched_logits_with_a_cache_match_onnxruntime(tiny_library, tiny_onnx):
    ids = make_ids(2, 5, seed=3)
    assert rel_err(load(tiny_library).logits(ids), ort_logits(tiny_onnx, ids)) < 1e-5


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_library):
    model = load(tiny_library)
    prompt = [5, 9, 100]
    greedy = model.generate(prompt, 12).token_ids
    assert model.generate(prompt, 12, temperature=0.7, top_k=1, seed=3).token_ids == greedy
    a = model.generate(prompt, 12, temperature=1.5, seed=7).token_ids
    assert a == model.generate(prompt, 12, temperature=1.5, seed=7).token_ids
    others = {tuple(model.generate(prompt, 12, temperature=1.5, seed=s).token_ids) for s in range(8, 12)}
    assert len(others | {tuple(a)}) > 1  # sampling does vary with the seed


def test_stream_is_an_iterator_with_stats(tiny_library):
    model = load(tiny_library)
    stats = gen.GenerationStats()
    tokens = model.stream([5, 9, 100], 6, stats=stats)
    first = next(tokens)
    assert stats.new_tokens == 1 and stats.time_to_first_token_s > 0
    rest = list(tokens)
    assert [first.id] + [t.id for t in rest] == model.generate_ids([5, 9, 100], 6)
    assert stats.new_tokens == 6 and stats.stop_reason == "max_new_tokens" and stats.decode_tokens_per_s > 0


def test_generation_stops_at_eos_and_at_the_context(tiny_library):
    model = load(tiny_library)
    prompt = [5, 9, 100]
    first = model.generate_ids(prompt, 1)[0]
    assert model.generate_ids(prompt, 10, eos_token_id=first) == [first]
    context = model.max_sequence
    stats = gen.GenerationStats()
    out = list(gen.stream(model, make_ids(1, context - 3, seed=1)[0], 10, stats=stats))
    assert len(out) == 3 and stats.stop_reason == "context"


def test_bad_generation_input(tiny_library):
    model = load(tiny_library)
    with pytest.raises(Pbs2pcError, match="prompt is empty"):
        model.generate([], 4)
    with pytest.raises(Pbs2pcError, match="context is"):
        model.generate(make_ids(1, model.max_sequence, seed=2)[0], 4)
    with pytest.raises(Pbs2pcError, match="max_new_tokens"):
        model.generate([1, 2], 0)
    with pytest.raises(Pbs2pcError, match="temperature"):
        model.generate([1, 2], 4, temperature=-1)
    with pytest.raises(Pbs2pcError, match="KV cache holds"):
        model.prefill([1, 2, 3], capacity=64)
        for _ in range(62):
            model.step(1)


def test_sampler_filters():
    logits = np.array([0.0, 3.0, 2.9, -1.0, 2.0])
    greedy = Sampler(SamplingParams())
    assert greedy(logits) == 1
    top2 = Sampler(SamplingParams(temperature=5.0, top_k=2, seed=0))
    assert {top2(logits) for _ in range(200)} == {1, 2}
    # top-p: probabilities at T=1 are ~[.03, .42, .38, .01, .15]; 0.5 keeps tokens 1 and 2 only.
    nucleus = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0))
    assert {nucleus(logits) for _ in range(200)} == {1, 2}
    full = Sampler(SamplingParams(temperature=1.0, seed=0))
    counts = np.bincount([full(logits) for _ in range(4000)], minlength=5) / 4000
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert np.abs(counts - probs).max() < 0.03
    for bad in (dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=float("nan"))):
        with pytest.raises(Pbs2pcError):
            SamplingParams(**bad)
