"""The Triton kernels' targets: every variant compiles ahead of time for NVIDIA sm_90 and AMD
gfx942 and gfx1100 on any machine, and for gfx1030 where the installed Triton compiles for it
(``lowbit.kernels.aot_check``); AMD's compiler options by architecture; and Triton offered only on
GPUs it can compile for."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
C = pytest.importorskip("lowbit.kernels.triton_common")


def _without_interpreter() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


def test_kernels_compile_for_every_target():
    """Every kernel variant lowers to a cubin for sm_90 and an hsaco for gfx942 and gfx1100, on any
    machine; for gfx1030 (RDNA2) too where the installed Triton compiles for it (3.5 to 3.8), and
    otherwise (3.9, CI's) the check says that it is refused."""
    proc = subprocess.run([sys.executable, "-m", "lowbit.kernels.aot_check"], env=_without_interpreter(),
                          capture_output=True, text=True, timeout=900)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    from lowbit.kernels import aot_check

    refused = {line.split()[1] for line in lines if line.startswith("refused ")}
    compiled = {line.split()[1] for line in lines if line.startswith("ok ")}
    optional = {f"{t[0]}:{t[1]}" for t in aot_check.WHERE_SUPPORTED}
    assert compiled - optional == {"cuda:90", "hip:gfx942", "hip:gfx1100"}
    assert refused | (compiled & optional) == optional and not refused & compiled
    targets = [*aot_check.TARGETS, *(t for t in aot_check.WHERE_SUPPORTED if f"{t[0]}:{t[1]}" not in refused)]
    want = sum(target[0] in v.backends for v in aot_check.variants() for target in targets)
    assert sum(line.startswith("ok ") for line in lines) == want


def test_the_architecture_probe_compiles_for_rdna3_and_refuses_what_no_backend_knows():
    """``triton_common.compiles_for``, which decides whether a gfx10xx Radeon gets the Triton
    kernels and which targets of ``WHERE_SUPPORTED`` the compile check compiles for: yes for
    gfx1100 (a target of every Triton here), no for an architecture that does not exist."""
    code = "from lowbit.kernels import triton_common as C; print(C.compiles_for('gfx1100'), C.compiles_for('gfx9999'))"
    proc = subprocess.run([sys.executable, "-c", code], env=_without_interpreter(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["True", "False"]


@pytest.mark.parametrize(("arch", "mfma"), [("gfx942", True), ("gfx90a", True), ("gfx1030", False), ("gfx1100", False)])
def test_matrix_core_options_only_for_cdna(arch, mfma):
    opts = dict(C.hip_options(arch))
    assert opts["waves_per_eu"] == 2
    assert ("matrix_instr_nonkdim" in opts) == mfma and ("kpack" in opts) == mfma
    assert C.matmul_config(16, 512, 512, 64, 100, arch).hip == C.hip_options(arch)
    assert C.matmul_config(16, 512, 512, 64, 100, None).hip == ()


@pytest.mark.parametrize(("hip", "arch", "compiles", "usable"),
                         [(None, "", None, True), ("6.4", "gfx942:sramecc+:xnack-", None, True),
                          ("6.4", "gfx1100", None, True), ("6.4", "gfx1030", False, False),
                          ("6.4", "gfx1030", True, True)],
                         ids=["cuda", "gfx942", "gfx1100", "gfx1030-refused", "gfx1030-compiled"])
def test_triton_is_offered_on_gpus_it_compiles_for(monkeypatch, hip, arch, compiles, usable):
    """CUDA, CDNA and RDNA3 always; a gfx10xx Radeon where the installed Triton compiles for its
    architecture (``compiles_for``, asked only for those)."""
    from types import SimpleNamespace

    from lowbit import kernels

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(gcnArchName=arch))
    monkeypatch.setattr(C, "compiles_for", lambda a: asked.append(a) or compiles)
    kernels._gcn_arch.cache_clear()  # the architecture is read once per device
    try:
        assert kernels.triton_gpu_available() is usable
    finally:
        kernels._gcn_arch.cache_clear()
    assert asked == ([arch] if compiles is not None else [])
