"""What every GPU bench here shares: CUDA-graph and eager timing with CUDA events, the input sets
that keep the L2 cold, the device line and the JSON rows, the error of a row against its
reference, and the switches a row sets on a kernel module for its calls. Plain helpers, no rows
(``bench/kernels.py`` builds those)."""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from collections.abc import Callable

import torch

# --- timing ------------------------------------------------------------------------------

def _median_us(one_pass: Callable[[], object], calls_per_pass: int, reps: int, trials: int) -> float:
    """Median over ``trials`` of the µs per call of ``reps`` passes, timed with CUDA events."""
    samples = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            one_pass()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (reps * calls_per_pass))
    return statistics.median(samples)


def time_graph(calls: list[Callable[[], object]], reps: int = 20, trials: int = 7) -> float:
    """Median µs per call of ``calls`` (each run once per pass), captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:  # compile and warm up outside the capture
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    return _median_us(graph.replay, len(calls), reps, trials)


def time_eager(calls: list[Callable[[], object]], reps: int = 20, trials: int = 7) -> float:
    """Median µs per call launched from Python (same rotation as :func:`time_graph`)."""
    for c in calls:
        c()
    torch.cuda.synchronize()

    def one_pass() -> None:
        for c in calls:
            c()

    return _median_us(one_pass, len(calls), reps, trials)


def copies_for(nbytes: int, l2: int) -> int:
    """Input sets needed so that one pass over them reads at least 4x the L2."""
    return max(2, min(64, math.ceil(4 * l2 / max(nbytes, 1))))


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(0)
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def start_gpu_bench(script: str) -> int:
    """Exit unless a GPU is present; seed, print the device and versions; return the L2 size in bytes."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA or ROCm GPU")
    # imported here, not at the top: every script run from bench/ has this folder on sys.path, where
    # transformers' and bitsandbytes' probes for the hub's ``kernels`` package import this file
    import triton

    torch.manual_seed(0)
    l2 = l2_bytes()
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB; "
          f"torch {torch.__version__}, triton {triton.__version__}")
    return l2


def write_rows(path: str, rows: list[dict]) -> None:
    """The rows with the device and versions, as JSON."""
    import triton

    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "rows": rows}, f, indent=1)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@contextlib.contextmanager
def switched(switches: list[tuple[object, str, object]]):
    """Each ``(module, name, value)`` set (module constants a wrapper reads at each call, so a graph
    capture and the eager calls both see them), then put back."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in switches]
    try:
        for module, name, value in switches:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def switching(module, fn: Callable, **values) -> Callable:
    """``fn`` with ``module``'s switches set to ``values`` for each call (:func:`switched`); None
    leaves one at its default. ``fn`` itself when every value is None, so that a default row's eager
    time is the wrapper's alone."""
    switches = [(module, name, value) for name, value in values.items() if value is not None]
    if not switches:
        return fn

    def call(*args, **kwargs):
        with switched(switches):
            return fn(*args, **kwargs)

    return call
