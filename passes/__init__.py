"""Relax passes (one per file), TE kernels (``kernels/``) and schedule rules (``schedules/``).

This module only exports pass constructors.
"""

from pbs2pc.passes.clip_take import ClipTakeIndices
from pbs2pc.passes.encode_mask_codes import EncodeMaskCodes
from pbs2pc.passes.fast_sigmoid import FastSigmoid
from pbs2pc.passes.interleave_rows import InterleaveRows
from pbs2pc.passes.kv_cache import UseKVCache
from pbs2pc.passes.lower_lm_head import LowerLMHead
from pbs2pc.passes.lower_sparse_binary_linear import LowerSparseBinaryLinear
from pbs2pc.passes.pack_planes_as_words import PackPlanesAsWords
from pbs2pc.passes.store_lm_head_fp16 import StoreLMHeadFP16
from pbs2pc.passes.store_lm_head_int8 import StoreLMHeadInt8

__all__ = ["ClipTakeIndices", "EncodeMaskCodes", "FastSigmoid", "InterleaveRows", "LowerLMHead", "LowerSparseBinaryLinear", "PackPlanesAsWords",
           "StoreLMHeadFP16", "StoreLMHeadInt8", "UseKVCache"]
