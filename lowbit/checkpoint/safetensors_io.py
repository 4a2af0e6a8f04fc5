"""Sharded safetensors checkpoints, read strictly and written atomically.

Writing goes to a temporary folder beside the destination, which is moved into place only
when complete: an existing checkpoint at the destination is intact until the moment it is
replaced. Reading never unpickles: a folder holding only ``.bin``/``.pt`` files is refused.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
ALIGN = 64
"""Bytes: tensors are read into memory at an address that is a multiple of this. safetensors returns
them at any multiple of 8, and PyTorch's CPU int8-weight kernel reads rows with aligned vector loads
(:mod:`lowbit.kernels.cpu_int8`); PyTorch's own CPU allocator aligns to 64 bytes."""


@contextmanager
def atomic_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``dest`` when the block completes.

    On an exception the temporary folder is removed and ``dest`` is left as it was. An
    existing ``dest`` is only replaced if it is a model folder (has ``config.json``) or empty,
    so a mistyped ``--out`` cannot wipe an unrelated folder. The files are flushed to disk before
    the swap, and on Linux the swap is one ``renameat2(RENAME_EXCHANGE)``: a process killed at any
    moment leaves ``dest`` either the old folder or the new one, never missing or partial.
    Temporary folders left beside ``dest`` by a killed process are removed by the next write.
    """
    dest = Path(dest).resolve()
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"output path {dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / "config.json").is_file():
        raise ValueError(f"refusing to replace {dest}: it is not empty and holds no config.json (not a model folder)")
    parent = dest.parent
    blocking = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise OSError(f"cannot write to {dest}: {blocking} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _clean_after_killed_writers(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=parent))
    except OSError as e:
        raise OSError(f"cannot write to {parent}: {e.strerror or e}") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it onto ``path``: a reader
    (or a rerun after a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _writer_alive(folder: Path) -> bool:
    """Whether the process that made a ``.<name>.tmp-<pid>-`` / ``.old-<pid>-`` folder still runs."""
    try:
        pid = int(folder.name.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return True  # not ours to judge
    try:
        os.kill(pid, 0)  # PermissionError: alive, another user's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _clean_after_killed_writers(dest: Path) -> None:
    """Undo what a writer killed mid-save left beside ``dest``: put back a previous folder it had
    moved aside (fallback swap only), remove its temporary folders."""
    for old in sorted(dest.parent.glob(f".{dest.name}.old-*")):
        if _writer_alive(old):
            continue
        if not dest.exists() and (old / "prev").is_dir():
            os.replace(old / "prev", dest)
            log.warning("restored %s, moved aside by a save that was killed", dest)
        shutil.rmtree(old, ignore_errors=True)
    for tmp in dest.parent.glob(f".{dest.name}.tmp-*"):
        if not _writer_alive(tmp):
            log.warning("removing %s, left by a save that was killed", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` to disk (so a power cut after the swap finds them whole)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    False where the system or filesystem does not offer it (the caller falls back to two renames).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_into_place(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        os.replace(tmp, dest)
        return
    if _exchange(tmp, dest):  # dest is the new folder; tmp now holds the previous one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-{os.getpid()}-", dir=dest.parent))
    os.replace(dest, old / "prev")
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old / "prev", dest)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def untied_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each shared tensor (tied weights) kept once, under the first
    name in module order."""
    seen: set[tuple[int, int, tuple[int, ...], torch.dtype]] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def save_state_dict(
    tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str = DEFAULT_SHARD_BYTES
) -> list[str]:
    """Write ``tensors`` as safetensors shards in ``folder`` (an index when more than one).

    Tensors must not share storage (drop tied duplicates first). Returns the file names.
    """
    limit = _parse_size(max_shard_size)
    if limit <= 0:
        raise ValueError(f"max_shard_size={max_shard_size!r} must be positive")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE_FILE, metadata={"format": "pt"})
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    return [*names, INDEX_FILE]


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, checked for presence."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{folder / INDEX_FILE} is malformed: {e}") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"checkpoint {folder} is missing shard(s): {', '.join(missing)}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
    if pickles:
        raise ValueError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); lowbit never unpickles "
            "checkpoints: convert them to safetensors first"
        )
    raise ValueError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it at an address that is a multiple of :data:`ALIGN`."""
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def load_state_dict(folder: Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor (or those whose name passes ``keep``) of a checkpoint folder, on CPU, each
    at an address that is a multiple of :data:`ALIGN`.

    Truncated or corrupt files raise ``ValueError`` naming the file.
    """
    out: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(folder):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if keep is None or keep(name):
                        out[name] = _aligned(f.get_tensor(name))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{path} is corrupt or truncated: {e}") from None
    return out
