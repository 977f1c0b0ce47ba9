"""Compressing a whole model: the method registry and the driver behind ``pbs2pc compress``.

A method takes the model (modified in place), the requested scheme and options, and replaces every linear
layer of the decoder blocks by a :class:`~pbs2pc.models.modules.SparseBinaryLinear`. Methods that need
calibration data (PBS2P and its baselines) register here too.
"""

from __future__ import annotations

import time
from typing import Callable

from tqdm.auto import tqdm

from pbs2pc.errors import Pbs2pcError
from pbs2pc.models.format import NMScheme, largest_group_size
from pbs2pc.models.modules import decoder_linears, replace_linear
from pbs2pc.models.simple import compress_weight

#: method name -> callable(model, scheme, tokenizer=..., **options) -> dict of extra info for the manifest
METHODS: dict[str, Callable] = {}


def register(name: str):
    def wrap(fn):
        METHODS[name] = fn
        return fn

    return wrap


def resolve_group_size(model, m: int, group_size: int | None) -> int:
    """``group_size`` if given, else 128 or the largest power of two below it that divides every K.

    SmolLM2-135M has K = 576 = 4.5 * 128, so it gets 64.
    """
    ks = [lin.in_features for lin in decoder_linears(model).values()]
    return largest_group_size(ks, m) if group_size is None else group_size


@register("simple")
def compress_simple(model, scheme: NMScheme, progress: bool = True, **_unused) -> dict:
    """Magnitude N:M mask + closed-form alpha/mu, no calibration (see :mod:`.simple`)."""
    layers = decoder_linears(model)
    for name, lin in tqdm(layers.items(), desc="compress (simple)", unit="layer", disable=not progress):
        replace_linear(model, name, compress_weight(lin.weight, scheme, lin.bias))
    return {}


def _register_calibrated():
    """PBS2P, its ablations and the baselines (all calibrated, layer-sequential; see docs/accuracy.md)."""
    from pbs2pc.models import baselines, pbs2p

    # PBS2P with the BiLLM/ARB structure (op contract v2), its ablations and the N:M-then-binarize ordering;
    # each also as a single-plane variant ("-1plane": one alpha B + mu per row and block, op contract v1)
    variants = {"pbs2p": {}, "pbs2p-nospbo": {"spbo_on": False}, "pbs2p-nocfs": {"cfs": False},
                "nm-then-binarize": {"spbo_on": False, "cfs": False, "mask_first": True}}
    for name, kw in variants.items():
        METHODS[name] = pbs2p.make_method(name, **kw)
        single = name.replace("pbs2p", "pbs2p-1plane") if "pbs2p" in name else f"{name}-1plane"
        METHODS[single] = pbs2p.make_method(single, groups=False, residual=False, **kw)
    METHODS["sign"] = baselines.sign_method
    METHODS["billm"] = baselines.billm_method
    METHODS["arb"] = baselines.arb_method
    METHODS["arb-nm"] = baselines.arb_nm_method  # experiment: N:M + ARB structure (PyTorch-only)
    from pbs2pc.models import gptq

    METHODS["gptq-w2"] = gptq.make_method(2)  # GPTQ 2-bit, groups of 128 (PyTorch-only; ignores N:M)
    METHODS["gptq-w3"] = gptq.make_method(3)


_register_calibrated()

#: methods whose output is a PyTorch-only evaluation model (not the op contract): export refuses them
PYTORCH_ONLY = ("billm", "arb", "arb-nm", "gptq-w2", "gptq-w3")


def compress_model(model, nm: str = "6:8", group_size: int | None = None, method: str = "simple", **options) -> dict:
    """Compress ``model`` in place; return the settings to record in the checkpoint manifest."""
    if method not in METHODS:
        raise Pbs2pcError(f"unknown compression method {method!r}; choose one of: {', '.join(sorted(METHODS))}.")
    n_m = NMScheme.parse(nm, None)
    scheme = NMScheme(n_m.n, n_m.m, resolve_group_size(model, n_m.m, group_size))
    for name, lin in decoder_linears(model).items():
        try:
            scheme.check_shape(lin.out_features, lin.in_features)
        except Pbs2pcError as exc:
            raise type(exc)(f"layer {name}: {exc}") from None
    start = time.perf_counter()
    extra = METHODS[method](model, scheme, **options)
    return {
        "method": method,
        "scheme": {"n": scheme.n, "m": scheme.m, "group_size": scheme.group_size},
        "seconds": round(time.perf_counter() - start, 2),
        **(extra or {}),
    }
