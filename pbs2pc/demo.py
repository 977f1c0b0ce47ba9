"""The end-to-end demo: compress -> export -> compile -> run, with perplexity at every stage.

On the bundled SmolLM2-135M (whose weights were already Q4_1-rounded in the GGUF file it ships as), at
6:8 with PBS2P (16 x 512 calibration tokens: the method and setting whose compression fits the demo's
budget of 15 minutes on 2 cores; ``--method simple`` takes seconds and collapses the model):

1. perplexity of the original model (PyTorch) and its greedy continuation of a prompt;
2. compress, and perplexity of the compressed model (PyTorch);
3. export to ONNX with pbs2p ops, and perplexity through onnxruntime (the reference);
4. compile for x86, run a prompt, and perplexity of the compiled library.

The last three must agree to a few parts in a million (same weights, fp32 everywhere); the first shows
what compression costs. Every step prints its time.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

PROMPT = "The capital of France is"


@dataclasses.dataclass
class DemoResult:
    perplexity: dict[str, float]
    seconds: dict[str, float]
    bits: dict
    tokens_scored: int
    continuation: str
    max_logit_rel_err: float
    original_continuation: str = ""


def _say(message: str) -> None:
    print(message, flush=True)


class _Clock:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def step(self, name: str):
        clock = self

        class _Step:
            def __enter__(self):
                self.start = time.perf_counter()
                _say(f"==> {name}")

            def __exit__(self, *exc):
                clock.seconds[name] = round(time.perf_counter() - self.start, 1)
                if exc[0] is None:
                    _say(f"    {name}: {clock.seconds[name]:.1f} s")

        return _Step()


def run_demo(model_spec: str = "smollm2-135m", nm: str = "6:8", out_dir: str | Path = "out/demo",
             target: str = "x86", seqlen: int = 512, windows: int | None = None,
             max_new_tokens: int = 12, method: str = "pbs2p", nsamples: int = 16) -> DemoResult:
    """Run the demo (see the module docstring); artifacts go to ``out_dir``.

    ``method`` other than ``simple`` (e.g. ``pbs2p``) calibrates on ``nsamples`` windows of 512 tokens of
    the calibration text (16: PBS2P's fast setting, the table rows of docs/accuracy.md).
    """
    from pbs2pc.runtime.reference import OrtDecoder

    from pbs2pc.commands.compile import compile_with_progress
    from pbs2pc.models import compress, data, evaluate, export, hf
    from pbs2pc.runtime import load

    out_dir = Path(out_dir)
    clock, ppl = _Clock(), {}
    with clock.step(f"load {model_spec}"):
        model, tokenizer, source = hf.load(model_spec)
        tokens = data.token_windows(tokenizer, "heldout", seqlen, windows).numpy()
        _say(f"    held-out text: {tokens.shape[0]} windows x {seqlen} tokens (gensim lee.cor); "
             f"weights are {source.note or 'as stored'}")
    with clock.step("perplexity: original (PyTorch)"):
        ppl["original (PyTorch)"] = evaluate.perplexity(evaluate.torch_logits_fn(model), tokens, "original")
    with clock.step("generate from a prompt (original model, PyTorch, greedy)"):
        original = _torch_greedy(model, tokenizer, PROMPT, max_new_tokens)
        _say(f"    {PROMPT!r} -> {original!r}")
    label = "simple: magnitude N:M + closed-form alpha, mu" if method == "simple" else f"{method}, {nsamples} x 512 calibration tokens"
    options = {} if method == "simple" else {"tokenizer": tokenizer, "nsamples": nsamples, "seqlen": 512}
    with clock.step(f"compress {nm} ({label})"):
        info = compress.compress_model(model, nm, method=method, **options)
    with clock.step("perplexity: compressed (PyTorch)"):
        ppl["compressed (PyTorch)"] = evaluate.perplexity(evaluate.torch_logits_fn(model), tokens, "compressed")
    onnx_path = out_dir / "model.onnx"
    with clock.step(f"export {onnx_path}"):
        export.export(model, onnx_path, {"source_model": model_spec, "weights_note": source.note, **info})
    with clock.step("perplexity: compressed (onnxruntime)"):
        ort_logits = OrtDecoder(onnx_path).logits
        ppl["compressed (onnxruntime)"] = evaluate.perplexity(ort_logits, tokens, "onnxruntime")
    lib_path = out_dir / "model.so"
    with clock.step(f"compile for {target} -> {lib_path}"):
        manifest = compile_with_progress(onnx_path, lib_path, target)
    compiled = load(lib_path)
    with clock.step("generate from a prompt (compiled library, KV cache, greedy)"):
        generation = compiled.generate(PROMPT, max_new_tokens)
        continuation = generation.text
        _say(f"    {PROMPT!r} -> {continuation!r}")
        _say(f"    {generation.stats.summary()}")
    with clock.step("perplexity: compressed (compiled library)"):
        ppl["compressed (compiled)"] = evaluate.perplexity(compiled.logits, tokens, "compiled")
        window = tokens[:1]
        ref, got = ort_logits(window), compiled.logits(window)
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    scored = tokens.shape[0] * (tokens.shape[1] - 1)  # every token but the first of each window
    return DemoResult(ppl, clock.seconds, manifest["summary"], int(scored), continuation, rel, original)


def _torch_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` by the PyTorch model (the same tokenization the runtime uses)."""
    import torch

    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def format_result(result: DemoResult) -> str:
    """The demo's closing table."""
    lines = ["", f"Perplexity on held-out text ({result.tokens_scored} predicted tokens, same windows for every row):"]
    for name, value in result.perplexity.items():
        lines.append(f"  {name:<28} {value:>18,.3f}")
    lines += ["", f"Greedy continuation of {PROMPT!r}:",
              f"  {'original (PyTorch)':<28} {result.original_continuation!r}",
              f"  {'compressed (compiled)':<28} {result.continuation!r}", ""]
    b = result.bits
    lines += [
        f"compiled vs onnxruntime logits: max relative error {result.max_logit_rel_err:.2e} (first window)",
        f"bits per weight of the {b['layers']} compressed layers: {b['bits_interchange']:.3f} as stored in the "
        f"ONNX file, " + (f"{b['bits_target']:.3f} in the compiled weights (target layout), " if "bits_target" in b
                          else "") +
        f"{b['bits_compact']:.3f} with an exact N:M code, {b['bits_paper']:.3f} paper-style (kept signs only)",
        "time per step: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()),
    ]
    if result.perplexity.get("compressed (PyTorch)", 0) > 10 * result.perplexity.get("original (PyTorch)", 1):
        lines.append("note: binarizing every linear layer of a 135M-parameter model costs most of its quality (PBS2P "
                     "6:8 takes SmolLM2 from 31 to about 340, dense ARB binarization to about 370, GPTQ 3-bit to "
                     "about 100; docs/accuracy.md); the last three rows show that export and compilation reproduce "
                     "the compressed model exactly.")
    return "\n".join(lines)
