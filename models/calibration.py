"""Layer-sequential calibration: capture, Hessians, compressed propagation, resume.

The driver follows the BiLLM / ARB-LLM / GPTQ code bases (docs/accuracy.md, method notes §1.1):

1. the inputs of decoder layer 0 are captured for every calibration sequence (a pre-hook stops the model
   right there); the other arguments each layer receives (rotary embeddings, masks; they differ per layer
   in Gemma-3) are captured once from one sequence, and broadcast over the batch;
2. for each decoder layer in turn: the layer (only it) is moved to ``device``; forward hooks on its linears
   accumulate ``H = 2/n sum x x^T`` from the layer's own inputs in one pass with its original weights; a
   compressor replaces every linear; the layer is run again and its *compressed* outputs become the next
   layer's inputs;
3. after every layer the state (compressed layer, next inputs, statistics) is written to ``resume_dir``, so
   an interrupted run resumes from the last finished layer and gives bit-identical results.

Memory on the device is one decoder layer plus the activations of one batch; all calibration activations
(``nsamples x seqlen x hidden`` float32) stay on the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pbs2pc.errors import Pbs2pcError
from pbs2pc.models.format import ARRAY_FIELDS, NMScheme, PackedLinear
from pbs2pc.models.modules import SparseBinaryLinear, _decoder_layers, replace_linear


class _Stop(Exception):
    pass


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def calibration_ids(tokenizer=None, calib_ids=None, calib: str = "calib", nsamples: int = 128, seqlen: int = 512, seed: int = 0):
    """The calibration token windows ``[nsamples, seqlen]``: given directly, or sampled from a corpus."""
    if calib_ids is not None:
        return torch.as_tensor(calib_ids, dtype=torch.long)
    if tokenizer is None:
        raise Pbs2pcError("this method needs calibration data: pass tokenizer= (or calib_ids=) to compress_model.")
    from pbs2pc.models.data import calibration_batches

    return calibration_batches(tokenizer, calib, nsamples=nsamples, seqlen=seqlen, seed=seed)


@torch.no_grad()
def capture_inputs(model, ids: torch.Tensor, batch_size: int = 8):
    """``(hidden [nsamples, seqlen, d], kwargs per layer)``: what every decoder layer is called with.

    The model's own forward runs up to layer 0 (embedding, scaling, rotary tables, masks); nothing beyond.
    """
    layers = _decoder_layers(model)
    kwargs: list[dict | None] = [None] * len(layers)

    def grab(i):
        def hook(module, args, kw):
            kwargs[i] = {k: v for k, v in kw.items() if k not in ("past_key_values", "cache", "past_key_value")}
            kwargs[i]["use_cache"] = False
            if i == len(layers) - 1:
                raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(ids[:1], use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    chunks = []

    def first(module, args, kw):
        chunks.append((args[0] if args else kw["hidden_states"]).detach().float().cpu())
        raise _Stop

    handle = layers[0].register_forward_pre_hook(first, with_kwargs=True)
    try:
        for start in range(0, len(ids), batch_size):
            try:
                model(ids[start : start + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(chunks), kwargs


@torch.no_grad()
def run_layer(layer, hidden: torch.Tensor, kwargs: dict, device, batch_size: int = 8, hook_batch=None) -> torch.Tensor:
    """Outputs of one decoder layer for all inputs (batched on ``device``; results on the host)."""
    kw = _to(kwargs, device)
    outs = []
    for start in range(0, len(hidden), batch_size):
        out = layer(hidden[start : start + batch_size].to(device), **kw)
        out = out[0] if isinstance(out, (tuple, list)) else out
        outs.append(out.float().cpu())
        if hook_batch is not None:
            hook_batch()
    return torch.cat(outs)


class HessianHooks:
    """Accumulate ``H = 2/n sum x x^T`` for every ``nn.Linear`` of a module from its inputs.

    Linears that read the same tensor (q, k, v; gate, up) share one product per batch.
    """

    def __init__(self, module: nn.Module):
        self.linears = {name: mod for name, mod in module.named_modules() if isinstance(mod, nn.Linear)}
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._cache: dict[tuple, torch.Tensor] = {}
        self._handles = [mod.register_forward_hook(self._hook(name)) for name, mod in self.linears.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            x = inputs[0]
            # keyed by storage address; the cache holds ``x`` itself so that no other tensor can reuse the
            # address before end_batch() (else gate_proj could pick up q_proj's product)
            key = (x.data_ptr(), tuple(x.shape), x.dtype)
            if key not in self._cache:
                x2 = x.reshape(-1, x.shape[-1]).float()
                self._cache[key] = (x2.T @ x2, x2.shape[0], x)
            prod, count, _ = self._cache[key]
            self.sums[name] = self.sums[name] + prod if name in self.sums else prod.clone()
            self.tokens[name] = self.tokens.get(name, 0) + count
        return hook

    def end_batch(self):
        self._cache.clear()

    def hessians(self) -> dict[str, torch.Tensor]:
        return {name: 2.0 * s / self.tokens[name] for name, s in self.sums.items()}

    def remove(self):
        for h in self._handles:
            h.remove()


@torch.no_grad()
def layer_cosines(model, hidden: torch.Tensor, kwargs: list, device="cpu", batch_size: int = 8) -> list[float]:
    """Mean over tokens of ``cos(h_in, h_out)`` for every decoder layer of the (uncompressed) model."""
    cos = []
    for i, layer in enumerate(_decoder_layers(model)):
        layer.to(device)
        out = run_layer(layer, hidden, kwargs[i], device, batch_size)
        layer.to("cpu")
        cos.append(float(nn.functional.cosine_similarity(hidden, out, dim=-1).mean()))
        hidden = out
    return cos


# ----------------------------------------------------------------------------------------------------------
# The sequential driver and its resume state

#: A layer compressor: (layer index, {name: linear}, {name: H}, prepared) -> ({name: PackedLinear | dense}, stats)
LayerCompressor = Callable[[int, dict, dict], tuple[dict, dict]]


def _payload(replacement):
    if isinstance(replacement, PackedLinear):
        s = replacement.scheme
        arrays = {k: getattr(replacement, k) for k in ARRAY_FIELDS}
        return {"kind": "packed", "scheme": [s.n, s.m, s.group_size], **{k: v for k, v in arrays.items() if v is not None}}
    return {"kind": "dense", "weight": replacement.detach().cpu().clone()}


def _from_payload(p):
    if p["kind"] == "packed":
        arrays = {k: p.get(k) for k in ARRAY_FIELDS}
        return PackedLinear(scheme=NMScheme(*p["scheme"]), **arrays)
    return p["weight"]


def apply_replacement(model, layer_index: int, name: str, replacement):
    """Put a compressed linear into the model: a :class:`PackedLinear` swaps the module, a tensor the weight."""
    full = f"model.layers.{layer_index}.{name}"
    if isinstance(replacement, PackedLinear):
        replace_linear(model, full, replacement)
    else:
        model.get_submodule(full).weight.data.copy_(replacement.to(torch.float32))


def _atomic_save(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def settings_key(settings: dict, ids: torch.Tensor) -> str:
    """A stable hash of the settings and the calibration tokens, so a resume never mixes two runs."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(ids.numpy()).tobytes())
    return h.hexdigest()[:16]


def sequential_compress(
    model,
    ids: torch.Tensor,
    compress_layer: LayerCompressor,
    settings: dict,
    device: str = "cpu",
    batch_size: int = 8,
    resume_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "compress",
    prepare: Callable | None = None,
    stop_after_layer: int | None = None,
) -> dict:
    """Compress ``model`` layer by layer (see the module docstring); return per-layer statistics.

    ``prepare(hidden, kwargs) -> dict`` runs once before the first layer (CFS uses it for layer importance);
    its result is stored in the resume state and passed back as ``stats["prepared"]``.
    ``stop_after_layer`` raises ``KeyboardInterrupt`` after that layer is saved (tests use it).
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Pbs2pcError("--device cuda was given but PyTorch sees no CUDA GPU; use --device cpu.")
    layers = _decoder_layers(model)
    key = settings_key(settings, ids)
    state_dir = Path(resume_dir) if resume_dir else None
    state = {"key": key, "next": 0, "layers": [], "prepared": None}
    hidden = kwargs = None
    start_time = time.perf_counter()
    if state_dir and (state_dir / "state.json").exists():
        saved = json.loads((state_dir / "state.json").read_text())
        if saved.get("key") == key:
            state = saved
            for i in range(state["next"]):
                for name, p in torch.load(state_dir / f"layer{i}.pt", weights_only=False).items():
                    apply_replacement(model, i, name, _from_payload(p))
            if state["next"] > 0:
                hidden, kwargs = torch.load(state_dir / "inputs.pt", weights_only=False)
    if hidden is None:
        hidden, kwargs = capture_inputs(model, ids, batch_size)
        if state["next"] > 0:
            raise Pbs2pcError(f"resume state in {state_dir} lacks inputs.pt; delete the folder and run again.")
    if state["prepared"] is None and prepare is not None:
        state["prepared"] = prepare(hidden, kwargs)
    if state_dir:
        state_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(range(state["next"], len(layers)), initial=state["next"], total=len(layers), desc=desc,
               unit="layer", disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        layer = layers[i].to(device)
        hooks = HessianHooks(layer)
        try:
            run_layer(layer, hidden, kwargs[i], device, batch_size, hook_batch=hooks.end_batch)
        finally:
            hooks.remove()
        hessians = hooks.hessians()
        del hooks
        linears = {n: l for n, l in layer.named_modules() if isinstance(l, nn.Linear)}
        replacements, stats = compress_layer(i, linears, hessians, state["prepared"])
        del hessians
        for name, rep in replacements.items():
            apply_replacement(model, i, name, rep)
        layer = layers[i].to(device)
        hidden = run_layer(layer, hidden, kwargs[i], device, batch_size)
        layer.to("cpu")
        for mod in layer.modules():
            if isinstance(mod, SparseBinaryLinear):
                mod._dense = None
        stats["seconds"] = round(time.perf_counter() - t0, 2)
        state["layers"].append(stats)
        state["next"] = i + 1
        bar.set_postfix(last=f"{stats['seconds']:.1f}s")
        if state_dir:
            _atomic_save({n: _payload(r) for n, r in replacements.items()}, state_dir / f"layer{i}.pt")
            _atomic_save((hidden, kwargs), state_dir / "inputs.pt")
            tmp = state_dir / "state.json.tmp"
            tmp.write_text(json.dumps(state))
            os.replace(tmp, state_dir / "state.json")
        if stop_after_layer is not None and i == stop_after_layer:
            raise KeyboardInterrupt(f"stopped after layer {i} (test hook)")
    return {
        "layers": state["layers"],
        "prepared": state["prepared"],
        "seconds_this_run": round(time.perf_counter() - start_time, 2),
    }
