"""Export a compressed Llama-family model to ONNX with ``pbs2p.SparseBinaryLinear`` nodes.

The graph is written directly with ``onnx.helper`` from the model's config and weights (as onnxruntime-genai's
model builder does) rather than traced: the result is small, deterministic, uses only ops that both
onnxruntime and pbs2pc's importer support, and names things predictably. It is a decoder "with past", in
the naming optimum and onnxruntime-genai use, so one file serves prefill and decode:

=============================  ======================================  =====================================
name                           shape (int64 unless said)               meaning
=============================  ======================================  =====================================
``input_ids``                  ``[batch, sequence]``                   new tokens
``attention_mask``             ``[batch, total_sequence]``             1 = attend, 0 = padding; past + new
``position_ids``               ``[batch, sequence]``                   rotary positions of the new tokens
``past_key_values.{i}.key``    float32 ``[batch, kv_heads, past_sequence, head_dim]``  (``.value`` alike)
``logits``                     float32 ``[batch, sequence, vocab]``    output
``present.{i}.key``            float32 ``[batch, kv_heads, total_sequence, head_dim]`` (``.value`` alike)
=============================  ======================================  =====================================

A prompt is run with empty past tensors (``past_sequence = 0``). Attention is the standard ONNX
``Attention`` op (opset 23) with ``past_key``/``past_value`` in and ``present_key``/``present_value`` out;
query ``q`` attends key ``k`` when ``cumsum(attention_mask)[k] - 1 <= position_ids[q]`` and
``attention_mask[k] == 1`` (causal by position, padding excluded), given as an explicit boolean mask.
Every decoder-block linear that was compressed becomes a pbs2p node (the reference FunctionProtos are
attached; a layer with op contract version 2 structure passes its group and residual planes too, and
then the file imports pbs2p opset 2 and records format version 2, otherwise opset 1 and version 1); the rest (embedding, norms, the LM head) stays float32. Weights go to external data
(``model.onnx.data``).

Correctness is tested against the PyTorch model: onnxruntime must reproduce its logits.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import pbs2pc
from pbs2pc.errors import UnsupportedError
from pbs2pc.models import onnx_op
from pbs2pc.models.format import V2_FIELDS
from pbs2pc.models.modules import SparseBinaryLinear

SUPPORTED_MODEL_TYPES = ("llama",)
INPUT, MASK, POSITIONS, OUTPUT = "input_ids", "attention_mask", "position_ids", "logits"


def past_names(layer: int) -> tuple[str, str]:
    """Graph input names of one layer's cached keys and values (optimum's naming)."""
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    """Graph output names of one layer's keys and values after this call."""
    return f"present.{layer}.key", f"present.{layer}.value"


class _Graph:
    """Accumulates nodes and initializers; every helper returns the name of its output."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.fresh(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def op_n(self, op_type: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> list[str]:
        """A node with several (named) outputs."""
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, array, dtype=np.int64) -> str:
        return self.init(self.fresh("const"), np.asarray(array, dtype=dtype))


def _weight(t) -> np.ndarray:
    return t.detach().float().numpy()


class _LlamaExporter:
    def __init__(self, model):
        self.model, self.cfg, self.g = model, model.config, _Graph()
        c = self.cfg
        self.hidden = c.hidden_size
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.scalar_cache: dict[float, str] = {}

    def scalar(self, value: float) -> str:
        if value not in self.scalar_cache:
            self.scalar_cache[value] = self.g.const(value, np.float32)
        return self.scalar_cache[value]

    def rms_norm(self, x: str, weight, prefix: str) -> str:
        g = self.g
        w = g.init(f"{prefix}.weight", _weight(weight.weight))
        sq = g.op("Mul", [x, x])
        mean = g.op("ReduceMean", [sq, g.const([-1])], keepdims=1)
        denom = g.op("Sqrt", [g.op("Add", [mean, self.scalar(float(weight.variance_epsilon))])])
        return g.op("Mul", [g.op("Div", [x, denom]), w], hint="norm")

    def linear(self, x: str, module, name: str) -> str:
        g = self.g
        if isinstance(module, SparseBinaryLinear):
            p = module.packed()
            planes = {k: None if getattr(p, k) is None else g.init(f"{name}.{k}", getattr(p, k)) for k in onnx_op.INPUTS[1:]}
            out = g.fresh(name.rsplit(".", 1)[-1])
            v2 = {k: planes[k] for k in V2_FIELDS}
            g.nodes.append(onnx_op.make_node(x, planes["sign"], planes["mask"], planes["alpha"], planes["mu"],
                                             planes["bias"], out, n=p.scheme.n, m=p.scheme.m,
                                             group_size=p.scheme.group_size, name=name, **v2))
            return out
        w = g.init(f"{name}.weight_t", _weight(module.weight).T)
        y = g.op("MatMul", [x, w])
        if module.bias is not None:
            y = g.op("Add", [y, g.init(f"{name}.bias", _weight(module.bias))])
        return y

    def rope_tables(self) -> tuple[str, str]:
        """cos and sin tables ``[max_positions, head_dim]`` from the model's own rotary embedding."""
        rot = self.model.model.rotary_emb
        positions = np.arange(self.cfg.max_position_embeddings, dtype=np.float64)
        freqs = np.outer(positions, rot.inv_freq.double().numpy())
        emb = np.concatenate([freqs, freqs], axis=-1)
        scale = float(getattr(rot, "attention_scaling", 1.0))
        return (self.g.init("rope.cos", (np.cos(emb) * scale).astype(np.float32)),
                self.g.init("rope.sin", (np.sin(emb) * scale).astype(np.float32)))

    def rotate(self, x: str, cos: str, sin: str) -> str:
        """``x * cos + rotate_half(x) * sin`` for ``x`` ``[B, H, S, D]``."""
        g, half = self.g, self.head_dim // 2
        x1 = g.op("Slice", [x, g.const([0]), g.const([half]), g.const([-1])])
        x2 = g.op("Slice", [x, g.const([half]), g.const([self.head_dim]), g.const([-1])])
        rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])

    def attention(self, x: str, attn, prefix: str, layer: int, cos: str, sin: str, mask: str) -> str:
        g, d = self.g, self.head_dim

        def heads(t: str, count: int) -> str:  # [B, S, count*D] -> [B, count, S, D]
            return g.op("Transpose", [g.op("Reshape", [t, g.const([0, 0, count, d])])], perm=[0, 2, 1, 3])

        q = self.rotate(heads(self.linear(x, attn.q_proj, f"{prefix}.q_proj"), self.heads), cos, sin)
        k = self.rotate(heads(self.linear(x, attn.k_proj, f"{prefix}.k_proj"), self.kv_heads), cos, sin)
        v = heads(self.linear(x, attn.v_proj, f"{prefix}.v_proj"), self.kv_heads)
        # Grouped-query attention with the cache: 4-D inputs, query head h reads kv head h // (H / KV).
        ctx, _, _ = g.op_n("Attention", [q, k, v, mask, *past_names(layer)],
                           [g.fresh("attn"), *present_names(layer)], name=f"{prefix}.attention",
                           scale=float(d) ** -0.5)
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const([0, 0, self.heads * d])])
        return self.linear(ctx, attn.o_proj, f"{prefix}.o_proj")

    def mlp(self, x: str, mlp, prefix: str) -> str:
        g = self.g
        gate = self.linear(x, mlp.gate_proj, f"{prefix}.gate_proj")
        up = self.linear(x, mlp.up_proj, f"{prefix}.up_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])], hint="silu")
        return self.linear(g.op("Mul", [act, up]), mlp.down_proj, f"{prefix}.down_proj")

    def build(self) -> onnx.GraphProto:
        g, inner = self.g, self.model.model
        embed = g.init("model.embed_tokens.weight", _weight(inner.embed_tokens.weight))
        h = g.op("Gather", [embed, INPUT], axis=0, hint="embed")
        # Query q sees key k when the key's position (cumsum of the mask - 1) <= the query's position and the
        # key is not padding: a boolean mask [B, 1, S, T] that broadcasts over heads.
        key_pos = g.op("Sub", [g.op("CumSum", [MASK, g.const(1)]), g.const(1)], hint="key_positions")
        causal = g.op("LessOrEqual", [g.op("Unsqueeze", [key_pos, g.const([1])]),
                                      g.op("Unsqueeze", [POSITIONS, g.const([2])])])
        valid = g.op("Unsqueeze", [g.op("Cast", [MASK], to=TensorProto.BOOL), g.const([1])])
        mask = g.op("Unsqueeze", [g.op("And", [causal, valid]), g.const([1])], hint="attn_mask")
        cos_t, sin_t = self.rope_tables()
        cos = g.op("Unsqueeze", [g.op("Gather", [cos_t, POSITIONS], axis=0), g.const([1])])
        sin = g.op("Unsqueeze", [g.op("Gather", [sin_t, POSITIONS], axis=0), g.const([1])])
        for i, layer in enumerate(inner.layers):
            prefix = f"model.layers.{i}"
            a = self.attention(self.rms_norm(h, layer.input_layernorm, f"{prefix}.input_layernorm"),
                               layer.self_attn, f"{prefix}.self_attn", i, cos, sin, mask)
            h = g.op("Add", [h, a], hint="resid")
            f = self.mlp(self.rms_norm(h, layer.post_attention_layernorm, f"{prefix}.post_attention_layernorm"),
                         layer.mlp, f"{prefix}.mlp")
            h = g.op("Add", [h, f], hint="resid")
        h = self.rms_norm(h, inner.norm, "model.norm")
        if self.cfg.tie_word_embeddings:
            # The LM head shares the embedding table ([V, H]); multiply by its transpose.
            logits = g.op("MatMul", [h, g.op("Transpose", [embed], perm=[1, 0])])
        else:
            logits = self.linear(h, self.model.lm_head, "lm_head")
        g.nodes.append(helper.make_node("Identity", [logits], [OUTPUT], name="output"))
        layers = range(len(inner.layers))
        kv = lambda name, length: helper.make_tensor_value_info(  # noqa: E731
            name, TensorProto.FLOAT, ["batch", self.kv_heads, length, self.head_dim])
        inputs = [helper.make_tensor_value_info(INPUT, TensorProto.INT64, ["batch", "sequence"]),
                  helper.make_tensor_value_info(MASK, TensorProto.INT64, ["batch", "total_sequence"]),
                  helper.make_tensor_value_info(POSITIONS, TensorProto.INT64, ["batch", "sequence"])]
        inputs += [kv(name, "past_sequence") for i in layers for name in past_names(i)]
        outputs = [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", "sequence", self.cfg.vocab_size])]
        outputs += [kv(name, "total_sequence") for i in layers for name in present_names(i)]
        return helper.make_graph(g.nodes, "pbs2pc", inputs, outputs, g.inits)


def to_onnx(model, metadata: dict | None = None) -> onnx.ModelProto:
    """The ONNX model of a (compressed) Llama-family causal LM, in memory."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedError(
            f"exporting {model_type!r} models is not supported yet; supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    graph = _LlamaExporter(model).build()
    onnx_model = helper.make_model(
        graph, producer_name="pbs2pc", producer_version=pbs2pc.__version__, ir_version=10,
        opset_imports=[helper.make_opsetid("", onnx_op.ONNX_OPSET), helper.make_opsetid(onnx_op.DOMAIN, onnx_op.OPSET_VERSION)],
    )
    onnx_op.attach_functions(onnx_model)  # also imports the pbs2p opset the layers need (1, or 2 with v2 inputs)
    meta = {onnx_op.METADATA_KEY: str(onnx_op.contract_version(onnx_model)),
            **{k: _meta_str(v) for k, v in (metadata or {}).items()}}
    helper.set_model_props(onnx_model, meta)
    return onnx_model


def _meta_str(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def save(onnx_model: onnx.ModelProto, path: str | os.PathLike, check: bool = True) -> Path:
    """Write ``onnx_model`` to ``path`` with external data beside it, atomically, and check it.

    Both files are written into a temporary folder next to ``path`` and renamed into place only after
    ``onnx.checker`` (full check) passed, so a failure leaves nothing behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        onnx.save_model(onnx_model, tmp / path.name, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        if check:
            onnx.checker.check_model(str(tmp / path.name), full_check=True)
        for name in (path.name, data_name):
            os.chmod(tmp / name, 0o644)  # mkdtemp's folder is private; the files need not be
        os.replace(tmp / data_name, path.parent / data_name)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def export(model, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Export a compressed model to ``path`` (ONNX + external data); see the module docstring."""
    return save(to_onnx(model, metadata), path)
