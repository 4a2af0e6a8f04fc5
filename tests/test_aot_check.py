"""The Triton kernels' targets: every variant compiles ahead of time for NVIDIA sm_90 and AMD
gfx942 and gfx1100 on any machine (``lowbit.kernels.aot_check``), AMD's compiler options by
architecture, and Triton offered only on GPUs it can compile for."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
C = pytest.importorskip("lowbit.kernels.triton_common")


def test_kernels_compile_for_every_target():
    """Every kernel variant lowers to a cubin for sm_90 and an hsaco for gfx942 and gfx1100, on any
    machine; gfx1030 (RDNA2), which Triton cannot compile for, still fails (else it should become
    a target)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "lowbit.kernels.aot_check"], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    from lowbit.kernels import aot_check

    want = sum(target[0] in v.backends for v in aot_check.variants() for target in aot_check.TARGETS)
    assert sum(line.startswith("ok ") for line in lines) == want
    assert {line.split()[1] for line in lines if line.startswith("ok ")} == {"cuda:90", "hip:gfx942", "hip:gfx1100"}
    assert [line.split()[1] for line in lines if line.startswith("refused ")] == ["hip:gfx1030"]


@pytest.mark.parametrize(("arch", "mfma"), [("gfx942", True), ("gfx90a", True), ("gfx1030", False), ("gfx1100", False)])
def test_matrix_core_options_only_for_cdna(arch, mfma):
    opts = dict(C.hip_options(arch))
    assert opts["waves_per_eu"] == 2
    assert ("matrix_instr_nonkdim" in opts) == mfma and ("kpack" in opts) == mfma
    assert C.matmul_config(16, 512, 512, 64, 100, arch).hip == C.hip_options(arch)
    assert C.matmul_config(16, 512, 512, 64, 100, None).hip == ()


@pytest.mark.parametrize(("hip", "arch", "usable"), [(None, "", True), ("6.4", "gfx942:sramecc+:xnack-", True),
                                                     ("6.4", "gfx1100", True), ("6.4", "gfx1030", False)])
def test_triton_is_not_offered_on_gpus_it_cannot_compile_for(monkeypatch, hip, arch, usable):
    from types import SimpleNamespace

    from lowbit import kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(gcnArchName=arch))
    kernels._gcn_arch.cache_clear()  # the architecture is read once per device
    try:
        assert kernels.triton_gpu_available() is usable
    finally:
        kernels._gcn_arch.cache_clear()
