"""Sizes and peak memory: bytes of weights on disk and in memory, peak RSS or CUDA peak.

On CPU the peak is the process's resident-set high-water mark (``VmHWM``), reset at the start
of a measurement through ``/proc/self/clear_refs`` where Linux allows it; where it doesn't, a
background thread samples the resident set every few milliseconds instead (short spikes
between samples are missed; :attr:`PeakMemory.method` says which was used). On CUDA it is
``torch.cuda.max_memory_allocated`` after a reset.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_SAMPLE_SECONDS = 0.005


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``) in a model folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and persistent buffers, each shared storage counted once."""
    from lowbit.checkpoint.safetensors_io import untied_state_dict

    return sum(t.numel() * t.element_size() for t in untied_state_dict(model).values())


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def release_freed_memory() -> None:
    """Hand memory that Python and torch have freed back to the OS where the C library allows
    (glibc's ``malloc_trim``), so that a resident-set peak measured next starts from what is
    still in use, not from what an earlier step (loading, quantizing) left in the heap."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def current_rss_bytes() -> int | None:
    """Resident set size of this process now, or None where /proc is missing."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


class PeakMemory:
    """Context manager measuring peak memory on ``device`` while its block runs::

        with PeakMemory(torch.device("cpu")) as peak:
            run()
        peak.peak_bytes
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        device = torch.device(device)
        self.device = device.type
        self._cuda = device if device.type == "cuda" else None
        self.peak_bytes = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)
            torch.cuda.reset_peak_memory_stats(self._cuda)
            self.method = "torch.cuda.max_memory_allocated"
        elif _reset_hwm():
            self.method = "VmHWM after clear_refs"
        else:
            self.method = "sampled VmRSS"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            rss = current_rss_bytes() or 0
            self.peak_bytes = max(self.peak_bytes, rss)
            if self._stop.wait(_SAMPLE_SECONDS):
                return

    def __exit__(self, *exc: object) -> None:
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)
            self.peak_bytes = torch.cuda.max_memory_allocated(self._cuda)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak_bytes = (_status_kib("VmHWM") or 0) * 1024


def _reset_hwm() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None
