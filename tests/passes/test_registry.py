"""The kernel registry and the target presets: which kernel serves which call, which layout a target gets,
what ``--target x86`` resolves to. Nothing here runs compiled code, so every test runs on any x86 host."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("pbs2pc.compiler.tvm_compat")

from pbs2pc import cpu  # noqa: E402
from pbs2pc.compiler.targets import PRESETS, CompileOptions, canonical_json, get_preset, host_x86_preset  # noqa: E402
from pbs2pc.errors import Pbs2pcError, UnsupportedError  # noqa: E402
from pbs2pc.passes.kernels import registry  # noqa: E402


def _call(n=1536, k=576, g=64, one_row=True, interleave=16, dtype="uint8", coded=None):
    return registry.Call(n, k, g, one_row, interleave, dtype, True, True, False, coded)


def _chosen(preset_name, call, options=CompileOptions()):
    chosen = registry.select(registry.for_target(get_preset(preset_name), options), call)
    return None if chosen is None else chosen[0].name


def test_presets_are_hashable_and_canonical():
    a, b = get_preset("x86-avx2", num_cores=2), get_preset("x86-avx2", num_cores=2)
    assert a == b and hash(a) == hash(b) and len({a, b, get_preset("x86-avx2", num_cores=4)}) == 2
    assert a.target["num-cores"] == 2 and '"num-cores":2' in a.target_json
    assert a.target_json == canonical_json(dict(reversed(list(a.target.items()))))  # sorted keys, no spaces


def test_each_x86_target_gets_its_kernels_and_layout():
    assert _chosen("x86-avx512", _call(one_row=True, coded=(6, 8))) == "x86_avx512.gemv_fp32"
    assert _chosen("x86-avx512", _call(one_row=False)) == "x86_avx512.gemm_fp32"
    assert _chosen("x86-avx2", _call(one_row=True)) == "x86_avx2.gemv_fp32"
    assert _chosen("x86-avx2", _call(one_row=False)) == "x86_avx2.gemm_fp32"
    int8 = CompileOptions("int8")
    assert _chosen("x86-avx512", _call(one_row=True), int8) == "x86_avx512.gemv_int8"
    assert _chosen("x86-avx512", _call(one_row=False), int8) == "x86_avx512.gemm_int8"
    assert _chosen("x86-avx2", _call(one_row=True), int8) == "x86_avx2.gemv_int8"
    assert _chosen("x86-avx2", _call(one_row=False), int8) == "x86_avx2.gemm_fp32"  # the prompt in fp32
    # layouts: the AVX-512 kernels read pattern codes; AVX2 has no VBMI to expand them
    assert registry.target_layout(get_preset("x86-avx512"), CompileOptions()).mask_codes
    avx2 = registry.target_layout(get_preset("x86-avx2"), CompileOptions())
    assert avx2.interleave == 16 and avx2.word_bits == 8 and not avx2.mask_codes
    assert registry.target_layout(get_preset("arm"), CompileOptions()) == registry.ROW_MAJOR


def test_no_avx512_kernel_serves_the_avx2_target():
    entries = registry.for_target(get_preset("x86-avx2"), CompileOptions())
    assert entries and all(not f.startswith("avx512") for e in entries for f in e.features)
    assert all(set(e.features) <= set(PRESETS["x86-avx2"].features) for e in entries)


def test_a_call_no_entry_covers_runs_the_te_kernel():
    assert _chosen("x86-avx512", _call(n=40)) is None  # N not a multiple of 16
    assert _chosen("x86-avx2", _call(interleave=0)) is None  # row-major planes
    assert _chosen("x86-avx2", _call(dtype="uint32")) is None
    only_te = CompileOptions(kernels=())
    assert registry.for_target(get_preset("x86-avx512"), only_te) == []


def test_fp32_kernels_serve_int8_options_after_the_int8_ones():
    names = [e.name for e in registry.for_target(get_preset("x86-avx512"), CompileOptions("int8"))]
    assert names.index("x86_avx512.gemv_int8") < names.index("x86_avx512.gemv_fp32")
    assert names.index("x86_avx512.gemm_int8") < names.index("x86_avx512.gemm_fp32")


def test_options_are_checked_against_the_target():
    with pytest.raises(UnsupportedError, match="no int8-activation kernels"):
        CompileOptions("int8").check(get_preset("cuda"))
    with pytest.raises(Pbs2pcError, match="choose fp32 or int8"):
        CompileOptions("int4")
    assert CompileOptions().record() == {"activations": "fp32", "lm_head": "fp32"}
    forced = CompileOptions(layout=registry.Layout(32, 0), kernels=())
    assert forced.record()["layout"] == {"word_bits": 32, "interleave": 0, "mask_codes": False}
    with pytest.raises(ValueError):
        registry.Layout(word_bits=12)


def test_x86_resolves_to_the_best_target_this_cpu_runs(monkeypatch):
    if cpu.architecture() != "x86_64":
        pytest.skip("an x86 host resolves --target x86")
    best = host_x86_preset()
    assert not cpu.missing(best.features) and get_preset("x86").name == best.name
    monkeypatch.setenv(cpu.FEATURES_ENV, ",".join(PRESETS["x86-avx512"].features))
    assert host_x86_preset().name == "x86-avx512"
    monkeypatch.setenv(cpu.FEATURES_ENV, ",".join(PRESETS["x86-avx2"].features))
    assert host_x86_preset().name == "x86-avx2" and cpu.best_x86_target() == "x86-avx2"
    monkeypatch.setenv(cpu.FEATURES_ENV, "sse2,avx")
    with pytest.raises(UnsupportedError, match="lacks avx2"):
        host_x86_preset()


def test_unknown_targets_list_the_known_ones():
    with pytest.raises(Pbs2pcError, match="choose one of: x86, x86-avx512, x86-avx2, arm, rpi5, jetson-orin, cuda"):
        get_preset("riscv")


def test_preset_fields_are_data_not_flags():
    fields = {f.name for f in dataclasses.fields(PRESETS["x86-avx512"])}
    assert not fields & {"lut_kernels", "mask_codes", "plane_interleave", "plane_word_bits", "activations", "lm_head"}
