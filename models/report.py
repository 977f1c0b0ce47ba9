"""What a model file holds: its compressed layers and honest bits per weight.

Used by ``pbs2pc inspect`` on ONNX files and by the compiler, which stores the same summary in the
artifact's manifest. Bits per weight are averaged over the *compressed* weights, weighted by their count;
see :class:`pbs2pc.models.format.BitsPerWeight` for the three ways of counting.
"""

from __future__ import annotations

import dataclasses

import onnx

from pbs2pc.models import onnx_op
from pbs2pc.models.format import NMScheme, bits_per_weight


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

    @property
    def weights(self) -> int:
        return self.out_features * self.in_features

    def bits(self):
        return bits_per_weight(NMScheme(self.n, self.m, self.group_size), self.has_mu)


def onnx_layers(model: onnx.ModelProto) -> list[LayerInfo]:
    """The pbs2p layers of an ONNX model (shapes from the initializers' headers; data is not read)."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.domain != onnx_op.DOMAIN or node.op_type != onnx_op.OP_TYPE:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        names = list(node.input) + [""] * (len(onnx_op.INPUTS) - len(node.input))
        roles = dict(zip(onnx_op.INPUTS, names))
        out_features, packed_k = dims.get(roles["sign"], [0, 0])
        layers.append(LayerInfo(node.name or node.output[0], int(out_features), int(packed_k) * 8,
                                int(attrs.get("n", 0)), int(attrs.get("m", 0)), int(attrs.get("group_size", 0)),
                                bool(roles["mu"]), bool(roles["bias"])))
    return layers


def weight_inputs(model: onnx.ModelProto) -> set[str]:
    """The initializer names holding the pbs2p layers' weights: sign, mask, alpha and mu (the inputs the
    honest bits per weight count; bias is not a weight)."""
    names = set()
    for node in model.graph.node:
        if node.domain == onnx_op.DOMAIN and node.op_type == onnx_op.OP_TYPE:
            roles = dict(zip(onnx_op.INPUTS, node.input))
            names.update(roles[r] for r in ("sign", "mask", "alpha", "mu") if roles.get(r))
    return names


def summarize(layers: list[LayerInfo]) -> dict:
    """Totals over layers: weight count, schemes, weighted honest and paper-style bits per weight."""
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
        "bits_interchange": round(avg("interchange"), 4),
        "bits_compact": round(avg("compact"), 4),
        "bits_paper": round(avg("paper"), 4),
        "bits_scales": round(avg("scales"), 4),
    }


def format_layers(layers: list[LayerInfo], limit: int | None = None) -> list[str]:
    """Table rows, one per layer."""
    rows = [f"{'layer':<44} {'N x K':>13} {'n:m':>5} {'G':>4} {'bits':>6} {'compact':>7} {'paper':>5}"]
    for layer in layers[:limit]:
        b = layer.bits()
        rows.append(f"{layer.name:<44} {f'{layer.out_features}x{layer.in_features}':>13} "
                    f"{f'{layer.n}:{layer.m}':>5} {layer.group_size:>4} {b.interchange:>6.3f} {b.compact:>7.3f} {b.paper:>5.3f}")
    if limit is not None and len(layers) > limit:
        rows.append(f"... {len(layers) - limit} more layers")
    return rows
