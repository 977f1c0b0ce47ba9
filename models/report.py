"""What a model file holds: its compressed layers and honest bits per weight.

Used by ``pbs2pc inspect`` on ONNX files and by the compiler, which stores the same summary in the
artifact's manifest. Bits per weight are averaged over the *compressed* weights, weighted by their count;
see :class:`pbs2pc.models.format.BitsPerWeight` for the three ways of counting. Layers with op contract
version 2 structure (magnitude groups, a salient residual) are counted with it, as
:meth:`pbs2pc.models.format.PackedLinear.bits` counts them.
"""

from __future__ import annotations

import dataclasses
import os

import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from pbs2pc.models import onnx_op
from pbs2pc.models.format import NMScheme, bits_per_weight, unpack_bits


@dataclasses.dataclass
class LayerInfo:
    name: str
    out_features: int
    in_features: int
    n: int
    m: int
    group_size: int
    has_mu: bool
    has_bias: bool
    # op contract version 2 (absent in version-1 files and older manifests)
    has_groups: bool = False
    has_residual: bool = False
    salient_columns: int = 0

    @property
    def weights(self) -> int:
        return self.out_features * self.in_features

    @property
    def version(self) -> int:
        """The op contract version this layer needs: 2 with groups or a residual, else 1."""
        return 2 if self.has_groups or self.has_residual else 1

    @property
    def salient_fraction(self) -> float | None:
        """The share of columns with a residual plane (``None`` without a residual)."""
        return self.salient_columns / self.in_features if self.has_residual and self.in_features else None

    def bits(self):
        return bits_per_weight(NMScheme(self.n, self.m, self.group_size), self.has_mu, groups=self.has_groups,
                               salient_fraction=self.salient_fraction, rows=self.out_features)


def _salient_columns(tensor: onnx.TensorProto | None, residual_dims: list[int], k: int,
                     base_dir: str | os.PathLike | None) -> int:
    """The number of salient columns: counted from the ``salient`` plane when its bytes are at hand (in the
    file or, for external data, under ``base_dir``); otherwise bounded by the residual plane's width."""
    if tensor is not None and (not uses_external_data(tensor) or base_dir is not None):
        plane = numpy_helper.to_array(tensor, str(base_dir or ""))
        return int(unpack_bits(plane.reshape(1, -1), k).sum())
    width = residual_dims[1] if len(residual_dims) == 2 else 0
    return min(k, 8 * int(width))


def onnx_layers(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> list[LayerInfo]:
    """The pbs2p layers of an ONNX model (shapes from the initializers' headers).

    Only the small ``salient`` planes of version-2 layers are read, to count salient columns; pass the
    model file's folder as ``base_dir`` when the model was loaded without its external data.
    """
    inits = {t.name: t for t in model.graph.initializer}
    dims = {name: list(t.dims) for name, t in inits.items()}
    layers = []
    for node in model.graph.node:
        if node.domain != onnx_op.DOMAIN or node.op_type != onnx_op.OP_TYPE:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        roles = onnx_op.node_roles(node)
        out_features, packed_k = dims.get(roles["sign"], [0, 0])
        k = int(packed_k) * 8
        has_residual = bool(roles["salient"])
        salient = (_salient_columns(inits.get(roles["salient"]), dims.get(roles["residual"], []), k, base_dir)
                   if has_residual else 0)
        layers.append(LayerInfo(node.name or node.output[0], int(out_features), k,
                                int(attrs.get("n", 0)), int(attrs.get("m", 0)), int(attrs.get("group_size", 0)),
                                bool(roles["mu"]), bool(roles["bias"]), bool(roles["group"]), has_residual, salient))
    return layers


def weight_inputs(model: onnx.ModelProto) -> set[str]:
    """The initializer names holding the pbs2p layers' weights: every input but ``X`` and ``bias`` (sign,
    mask, alpha, mu and the version-2 planes and scales: the inputs the honest bits per weight count; bias
    is not a weight)."""
    names = set()
    for node in model.graph.node:
        if node.domain == onnx_op.DOMAIN and node.op_type == onnx_op.OP_TYPE:
            roles = onnx_op.node_roles(node)
            names.update(name for role, name in roles.items() if name and role not in ("X", "bias"))
    return names


def summarize(layers: list[LayerInfo]) -> dict:
    """Totals over layers: weight count, schemes, weighted honest and paper-style bits per weight, and how
    many layers carry version-2 structure (``salient_fraction``: the share of the compressed weights that
    lie on salient columns)."""
    total = sum(layer.weights for layer in layers)
    if not total:
        return {"layers": 0, "weights": 0}

    def avg(field):
        return sum(getattr(layer.bits(), field) * layer.weights for layer in layers) / total

    schemes = sorted({f"{layer.n}:{layer.m} g={layer.group_size}" for layer in layers})
    return {
        "layers": len(layers),
        "weights": total,
        "schemes": schemes,
        "format_version": max(layer.version for layer in layers),
        "layers_with_groups": sum(layer.has_groups for layer in layers),
        "layers_with_residual": sum(layer.has_residual for layer in layers),
        "salient_columns": sum(layer.salient_columns for layer in layers),
        "salient_fraction": round(sum(layer.salient_columns * layer.out_features for layer in layers) / total, 6),
        "bits_interchange": round(avg("interchange"), 4),
        "bits_compact": round(avg("compact"), 4),
        "bits_paper": round(avg("paper"), 4),
        "bits_scales": round(avg("scales"), 4),
    }


def _structure(layer: LayerInfo) -> tuple[str, str]:
    salient = (f"{layer.salient_columns} ({100 * layer.salient_fraction:.1f}%)" if layer.has_residual else "-")
    return ("yes" if layer.has_groups else "-"), salient


def format_layers(layers: list[LayerInfo], limit: int | None = None) -> list[str]:
    """Table rows, one per layer (``groups``: magnitude groups; ``salient``: salient columns with a residual
    plane, and their share of K; both only with version-2 structure in the file)."""
    v2 = any(layer.version == 2 for layer in layers)
    extra = f" {'groups':>6} {'salient':>12}" if v2 else ""
    rows = [f"{'layer':<44} {'N x K':>13} {'n:m':>5} {'G':>4}{extra} {'bits':>6} {'compact':>7} {'paper':>5}"]
    for layer in layers[:limit]:
        b = layer.bits()
        groups, salient = _structure(layer)
        extra = f" {groups:>6} {salient:>12}" if v2 else ""
        rows.append(f"{layer.name:<44} {f'{layer.out_features}x{layer.in_features}':>13} "
                    f"{f'{layer.n}:{layer.m}':>5} {layer.group_size:>4}{extra} "
                    f"{b.interchange:>6.3f} {b.compact:>7.3f} {b.paper:>5.3f}")
    if limit is not None and len(layers) > limit:
        rows.append(f"... {len(layers) - limit} more layers")
    return rows
