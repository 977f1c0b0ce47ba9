"""The compressed model in PyTorch: a sparse-binary linear module and the compressed-checkpoint folder.

A compressed checkpoint is a folder that ``pbs2pc compress`` writes and ``pbs2pc export`` reads:

- ``pbs2pc.json``: the format version, source model, method and settings, and per layer its n, m, group size;
- ``model.safetensors``: every tensor of the model; a compressed linear ``L`` is stored as ``L.sign``,
  ``L.mask``, ``L.alpha``, ``L.mu`` (and ``L.bias``) in the interchange form of :mod:`.format`;
- ``config.json`` and the tokenizer files, so the folder loads offline on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pbs2pc import FORMAT_VERSION
from pbs2pc.errors import Pbs2pcError
from pbs2pc.models.format import ARRAY_FIELDS, NMScheme, PackedLinear

MANIFEST = "pbs2pc.json"
WEIGHTS = "model.safetensors"
PLANES = ARRAY_FIELDS


def _unpack_torch(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/8] -> bool [N, K], little-endian within each byte."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)


class SparseBinaryLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored packed (sign, N:M mask, per-group alpha and mu).

    The dense weight is decoded on first use and cached for speed (PyTorch has no packed-bit matmul);
    it is not part of the state dict, which holds the packed planes only.
    """

    def __init__(self, packed: PackedLinear):
        super().__init__()
        packed.validate()
        self.scheme = packed.scheme
        self.in_features, self.out_features = packed.in_features, packed.out_features
        for name in PLANES:
            value = getattr(packed, name)
            self.register_buffer(name, None if value is None else torch.from_numpy(np.ascontiguousarray(value)))
        self._dense: torch.Tensor | None = None

    def packed(self) -> PackedLinear:
        """This layer in the numpy interchange form."""
        arrays = {name: None if getattr(self, name) is None else getattr(self, name).numpy() for name in PLANES}
        return PackedLinear(scheme=self.scheme, **arrays)

    def decode(self) -> torch.Tensor:
        """The float32 weight ``[N, K]`` (vectorised; matches :meth:`PackedLinear.dense`)."""
        g = self.scheme.group_size

        def per_column(scale):
            return scale.float().repeat_interleave(g, dim=1)

        sign = _unpack_torch(self.sign).float() * 2 - 1
        alpha = per_column(self.alpha)
        mu = per_column(self.mu) if self.mu is not None else torch.zeros_like(alpha)
        if self.group is not None:
            in_group = _unpack_torch(self.group)
            alpha = torch.where(in_group, per_column(self.group_alpha), alpha)
            mu = torch.where(in_group, per_column(self.group_mu), mu)
        w = sign * alpha + mu
        if self.salient is not None:
            cols = torch.nonzero(_unpack_torch(self.salient)[0]).flatten()
            r = _unpack_torch(self.residual)[:, : len(cols)].float() * 2 - 1
            w[:, cols] += per_column(self.residual_alpha)[:, cols] * r + per_column(self.residual_mu)[:, cols]
        if self.mask is not None:
            w = w * _unpack_torch(self.mask)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.decode()
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x, self._dense.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}"


def decoder_linears(model) -> dict[str, nn.Linear]:
    """The linear layers inside the decoder blocks (what gets compressed), by qualified name."""
    found = {}
    for i, layer in enumerate(_decoder_layers(model)):
        for name, module in layer.named_modules():
            if isinstance(module, (nn.Linear, SparseBinaryLinear)):
                found[f"model.layers.{i}.{name}"] = module
    return found


def _decoder_layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise Pbs2pcError(f"{type(model).__name__} has no model.layers; pbs2pc supports Llama-style decoders.")
    return layers


def replace_linear(model, name: str, packed: PackedLinear) -> SparseBinaryLinear:
    """Swap the linear ``name`` of ``model`` for a :class:`SparseBinaryLinear` holding ``packed``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    module = SparseBinaryLinear(packed)
    setattr(parent, child, module)
    return module


def save_compressed(model, tokenizer, folder: str | Path, info: dict) -> Path:
    """Write a compressed model (with :class:`SparseBinaryLinear` layers) to a checkpoint folder."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = {}
    for name, module in decoder_linears(model).items():
        if isinstance(module, SparseBinaryLinear):
            s = module.scheme
            layers[name] = {"n": s.n, "m": s.m, "group_size": s.group_size}
    tensors = {}
    for key, value in model.state_dict().items():
        if key not in tensors:
            tensors[key] = value.detach().contiguous().numpy()
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(folder / WEIGHTS))
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    manifest = {"format_version": FORMAT_VERSION, **info, "layers": layers}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def is_compressed_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(folder: str | Path) -> dict:
    """The ``pbs2pc.json`` of a compressed checkpoint folder, checked for its format version."""
    folder = Path(folder)
    if not is_compressed_dir(folder):
        raise Pbs2pcError(f"{folder} is not a compressed model folder (no {MANIFEST}); run pbs2pc compress first.")
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format_version") not in range(1, FORMAT_VERSION + 1):
        raise Pbs2pcError(
            f"{folder} uses format version {manifest.get('format_version')}, this pbs2pc reads versions 1 to "
            f"{FORMAT_VERSION}; compress the model again with this pbs2pc."
        )
    return manifest


def load_compressed(folder: str | Path):
    """Load ``(model, tokenizer, manifest)`` from a folder written by :func:`save_compressed`."""
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    manifest = read_manifest(folder)
    config = AutoConfig.from_pretrained(folder)
    # Built on the CPU (not the meta device): non-persistent buffers such as rotary frequencies are
    # computed at construction and are not in the checkpoint.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_file(str(folder / WEIGHTS))
    for name, spec in manifest["layers"].items():
        planes = {p: tensors.pop(f"{name}.{p}", None) for p in PLANES}
        replace_linear(model, name, PackedLinear(scheme=NMScheme(**spec), **planes))
    result = model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    compressed = set(manifest["layers"])
    missing = [
        k
        for k in result.missing_keys
        if k.rpartition(".")[0] not in compressed and not (k == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if missing or result.unexpected_keys:
        raise Pbs2pcError(
            f"{folder / WEIGHTS} does not match its config (missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}); the checkpoint is incomplete or from another model."
        )
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model.eval(), tokenizer, manifest
