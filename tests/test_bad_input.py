"""Bad input through the CLI: each case exits 2 with one clear ``lowbit: error:`` line (no
traceback), and the checkpoint already in ``--out`` is byte for byte what it was.

Every case runs against an existing, valid quantized checkpoint in ``--out``; checkpoint cases
load a damaged copy of it with ``lowbit convert`` (which would write ``--out`` if loading passed).
The list of cases is mirrored in docs/reliability.md.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import folder_digest
from lowbit.cli import main

TENSOR = "model.layers.0.self_attn.q_proj"


def tensors(folder: Path) -> dict:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def edit_config(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def truncate_at(offset):
    def damage(folder: Path) -> None:
        path = folder / "model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: offset(data)])
    return damage


def header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def rewrite(change):
    def damage(folder: Path) -> None:
        t = tensors(folder)
        change(t)
        save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    return damage


def missing_shard(folder: Path) -> None:
    t = tensors(folder)
    names = sorted(t)
    (folder / "model.safetensors").unlink()
    save_file({k: t[k] for k in names[::2]}, folder / "model-00001-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


class Marker:
    """Unpickling this object would create a file: proof that a pickle was never loaded."""

    path = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def pickle_only(folder: Path) -> None:
    import pickle

    (folder / "model.safetensors").unlink()
    marker = Marker()
    Marker.path = str(folder.parent / "UNPICKLED")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": marker}))


def poison_weight(value):
    def damage(folder: Path) -> None:
        import torch
        from safetensors.torch import load_file

        t = load_file(folder / "model.safetensors")
        key = next(k for k in t if k.endswith("mlp.up_proj.weight"))
        t[key][3, 5] = value
        save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
        assert not torch.isfinite(t[key]).all()
    return damage


# (id, which folder gets damaged ("good", "src" or None), damage, argv, fragment of the error)
# argv placeholders: {in} the (damaged copy of the) input folder, {out} the existing checkpoint,
# {tmp} the test's scratch folder.
Q = ["quantize", "{in}", "--out", "{out}"]
CONVERT = ["convert", "{in}", "{out}", "--to", "gptq"]
CASES = [
    # configs and flags
    ("unknown-method", "src", None, [*Q, "--method", "gptq9"], "gptq9"),
    ("bits-out-of-range", "src", None, [*Q, "--method", "gptq", "--bits", "5"], "bits=5"),
    # (the GPTQ layout allows a shorter last group; AutoAWQ's GEMM layout does not)
    ("awq-group-size-not-dividing", "src", None, [*Q, "--method", "awq", "--group-size", "48"], "48"),
    ("group-size-zero", "src", None, [*Q, "--group-size", "0"], "group_size=0"),
    ("damp-out-of-range", "src", None, [*Q, "--method", "gptq", "--damp-percent", "1.5"], "damp_percent=1.5"),
    ("flag-for-another-method", "src", None, [*Q, "--threshold", "6"], "--threshold does not apply"),
    ("bnb-bits-3", "src", None, [*Q, "--method", "bitsandbytes", "--bits", "3"], "--bits 3"),
    ("int8-threshold-negative", "src", None, [*Q, "--method", "bitsandbytes", "--bits", "8", "--threshold", "-1"],
     "threshold"),
    ("bnb-unknown-4bit-type", "src", None, [*Q, "--method", "bitsandbytes", "--quant-type", "nf3"], "nf3"),
    ("aqlm-scheme-malformed", "src", None, [*Q, "--method", "aqlm", "--scheme", "2by8"], "--scheme '2by8'"),
    ("aqlm-group-not-dividing", "src", None, [*Q, "--method", "aqlm", "--scheme", "1x4", "--in-group-size", "7"], "7"),
    ("calib-windows-zero", "src", None, [*Q, "--method", "gptq", "--nsamples", "0"], "nsamples"),
    ("prune-sparsity-above-1", "src", None, ["prune", "{in}", "--out", "{out}", "--method", "magnitude",
                                              "--sparsity", "1.5"], "sparsity=1.5"),
    ("prune-pattern-n-above-m", "src", None, ["prune", "{in}", "--out", "{out}", "--method", "magnitude",
                                               "--pattern", "4:2"], "4:2"),
    ("distill-no-steps", "src", None, ["distill", "{in}", "--out", "{out}", "--steps", "0"], "steps=0"),
    ("compare-unknown-method", "src", None, ["compare", "{in}", "--out", "{out}", "--methods", "bogus"], "bogus"),
    ("convert-unknown-target", "good", None, ["convert", "{in}", "{out}", "--to", "bogus"], "bogus"),
    ("model-folder-missing", None, None, ["eval", "{tmp}/nope"], "nope"),
    # checkpoints
    ("config-json-missing", "good", lambda f: (f / "config.json").unlink(), CONVERT, "config.json"),
    ("config-json-malformed", "good", lambda f: (f / "config.json").write_text("{not json"), CONVERT, "config.json"),
    ("quantization-config-not-a-dict", "good",
     lambda f: edit_config(f, lambda c: c.update(quantization_config=4)), CONVERT, "quantization_config"),
    ("quant-method-unknown", "good",
     lambda f: edit_config(f, lambda c: c["quantization_config"].update(quant_method="foo")), CONVERT, "foo"),
    ("quantization-config-bits-5", "good",
     lambda f: edit_config(f, lambda c: c["quantization_config"].update(bits=5)), CONVERT, "bits=5"),
    ("truncated-in-header-length", "good", truncate_at(lambda d: 4), CONVERT, "corrupt or truncated"),
    ("truncated-in-header", "good", truncate_at(lambda d: header_end(d) // 2), CONVERT, "corrupt or truncated"),
    ("truncated-in-data", "good", truncate_at(lambda d: len(d) - 7), CONVERT, "corrupt or truncated"),
    ("wrong-dtype", "good", rewrite(lambda t: t.update({f"{TENSOR}.qweight": t[f"{TENSOR}.qweight"].float()})),
     CONVERT, "qweight"),
    ("wrong-shape", "good", rewrite(lambda t: t.update({f"{TENSOR}.scales": t[f"{TENSOR}.scales"][:1].clone()})),
     CONVERT, "scales"),
    ("tensor-missing", "good", rewrite(lambda t: t.pop(f"{TENSOR}.qzeros")), CONVERT, "qzeros"),
    ("shard-missing", "good", missing_shard, CONVERT, "missing shard"),
    ("pickle-only", "good", pickle_only, CONVERT, "never unpickles"),
    ("plain-model-pickle-only", "src", pickle_only, Q, "never unpickles"),
    ("nan-weight", "src", poison_weight(float("nan")), Q, "NaN"),
    ("inf-weight", "src", poison_weight(float("inf")), Q, "Inf"),
    # calibration data
    ("calib-empty", "src", None, [*Q, "--method", "gptq", "--calib", "{tmp}/empty.txt"], "empty"),
    ("calib-one-token", "src", None, [*Q, "--method", "gptq", "--calib", "{tmp}/one.txt", "--seqlen", "16"],
     "too little calibration"),
    ("calib-not-utf8", "src", None, [*Q, "--method", "gptq", "--calib", "{tmp}/latin1.txt"], "not UTF-8"),
    ("calib-file-missing", "src", None, [*Q, "--method", "gptq", "--calib", "{tmp}/none.txt"], "does not exist"),
    # outputs
    ("out-under-a-file", "src", None, ["quantize", "{in}", "--out", "{tmp}/afile/out"], "afile is a file, not a folder"),
    ("out-is-a-file", "src", None, ["quantize", "{in}", "--out", "{tmp}/afile"], "not a folder"),
    ("out-not-a-model-folder", "src", None, ["quantize", "{in}", "--out", "{tmp}/notes"], "refusing to replace"),
]


@pytest.mark.parametrize(("damaged", "damage", "argv", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(tiny_checkpoint, tmp_path, capsys, damaged, damage, argv, fragment):
    out = tmp_path / "out"
    shutil.copytree(tiny_checkpoint["good"], out)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "one.txt").write_text("a")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    src = None
    if damaged is not None:
        src = tmp_path / "in"
        shutil.copytree(tiny_checkpoint[damaged], src)
        if damage is not None:
            damage(src)
    before = {p: folder_digest(p) for p in (out, tmp_path / "notes")}
    capsys.readouterr()
    rc = main([a.format(**{"in": src, "out": out, "tmp": tmp_path}) for a in argv])
    err = capsys.readouterr().err
    last = [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert rc == 2, err
    assert "Traceback" not in err
    assert last.startswith("lowbit: error: ") and fragment in last, last
    assert {p: folder_digest(p) for p in before} == before
    assert (tmp_path / "afile").read_text() == "not a folder"
    assert not list(tmp_path.glob(".*.tmp-*")), "a temporary folder was left behind"
    assert not (tmp_path / "UNPICKLED").exists(), "a pickle was loaded"


def test_disk_full_during_save_keeps_the_old_checkpoint(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import errno
    import os

    from lowbit.checkpoint import safetensors_io

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(safetensors_io, "save_file", full_disk)
    out = tmp_path / "out"
    shutil.copytree(tiny_checkpoint["good"], out)
    before = folder_digest(out)
    rc = main(["quantize", str(tiny_checkpoint["src"]), "--out", str(out), "--bits", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err.splitlines()[-1] and "Traceback" not in err
    assert folder_digest(out) == before
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_debug_shows_the_traceback(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="bits=5"):
        main(["--debug", "quantize", str(tiny_checkpoint["src"]), "--out", str(tmp_path / "o"), "--method", "gptq", "--bits", "5"])
