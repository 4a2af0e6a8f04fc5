"""Atomic output: ``lowbit quantize`` killed with SIGKILL at points during its save leaves the
checkpoint already in ``--out`` intact and loadable; the next save cleans up what it left."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import folder_digest
from lowbit.checkpoint import safetensors_io as io
from lowbit.cli import main

# Runs `lowbit quantize SRC --out OUT --bits 8` and SIGKILLs itself at POINT of the save.
DRIVER = textwrap.dedent("""
    import os, signal, sys
    from lowbit.checkpoint import safetensors_io as io

    point, src, out = sys.argv[1:4]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name, before=None, after=None):
        real = getattr(owner, name)
        def wrapped(*a, **k):
            if before and before(*a, **k):
                die()
            result = real(*a, **k)
            if after and after(*a, **k):
                die()
            return result
        setattr(owner, name, wrapped)

    import lowbit.api as api

    if point == "tmp-folder-empty":
        wrap(api, "save_state_dict", before=lambda *a, **k: True)
    elif point == "mid-shard":
        def half_then_die(tensors, path, metadata=None):
            from safetensors.torch import save
            data = save(tensors, metadata=metadata)
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            die()
        io.save_file = half_then_die
    elif point == "shard-written":
        wrap(api, "save_state_dict", after=lambda *a, **k: True)
    elif point == "before-swap":
        wrap(io, "_swap_into_place", before=lambda *a, **k: True)
    elif point == "fallback-swap-moved-aside":
        import types
        io._exchange = lambda a, b: False
        proxy = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
        io.os = proxy  # count only the checkpoint writer's renames
        wrap(proxy, "replace", after=lambda *a, **k: True)  # die once the old folder is moved aside
    elif point == "after-swap":
        wrap(io.shutil, "rmtree", before=lambda *a, **k: True)  # the new folder is in place; die
    else:
        raise SystemExit(f"unknown point {point}")

    from lowbit.cli import main
    sys.exit(main(["quantize", src, "--out", out, "--bits", "8", "--group-size", "32"]))
""")

POINTS = ["tmp-folder-empty", "mid-shard", "shard-written", "before-swap", "fallback-swap-moved-aside", "after-swap"]


def _loads(folder: Path, bits: int) -> None:
    import lowbit

    model = lowbit.from_pretrained(folder)
    assert lowbit.api.quantized_config(model).bits == bits


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_during_save_keeps_the_previous_checkpoint(tiny_checkpoint, tmp_path, point):
    out = tmp_path / "out"
    shutil.copytree(tiny_checkpoint["good"], out)
    before = folder_digest(out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", DRIVER, point, str(tiny_checkpoint["src"]), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if point == "after-swap":  # the new checkpoint was already in place when the process died
        _loads(out, 8)
    elif point == "fallback-swap-moved-aside":  # two-rename fallback: the old folder waits beside out
        assert not out.exists()
        (aside,) = tmp_path.glob(".out.old-*")
        assert folder_digest(aside / "prev") == before
    else:
        assert folder_digest(out) == before
        _loads(out, 4)
    # the next save to out begins by putting back or removing whatever the killed one left
    if point == "fallback-swap-moved-aside":
        io._clean_after_killed_writers(out.resolve())
        assert folder_digest(out) == before
    assert main(["quantize", str(tiny_checkpoint["src"]), "--out", str(out), "--bits", "2", "--group-size", "32"]) == 0
    _loads(out, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("A")
    (b / "f").write_text("B")
    if not io._exchange(a, b):
        pytest.skip("this filesystem has no RENAME_EXCHANGE; the two-rename fallback is tested above")
    assert (a / "f").read_text() == "B" and (b / "f").read_text() == "A"


def test_live_writers_temporary_folders_are_left_alone(tmp_path):
    out = tmp_path / "out"
    mine = tmp_path / f".out.tmp-{os.getpid()}-abc"
    dead_pid = _dead_pid()
    stale = tmp_path / f".out.tmp-{dead_pid}-xyz"
    foreign = tmp_path / ".out.tmp-notapid"
    for d in (mine, stale, foreign):
        d.mkdir()
    io._clean_after_killed_writers(out)
    assert mine.exists() and foreign.exists() and not stale.exists()


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)
