"""Checkpoint I/O: strict loading, clear errors, and atomic replacement of outputs."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit import RtnConfig
from lowbit.checkpoint.safetensors_io import SINGLE_FILE, atomic_folder


@pytest.fixture(scope="module")
def saved(tiny_model_dir_module, tmp_path_factory):
    model = lowbit.from_pretrained(tiny_model_dir_module, quantization_config=RtnConfig(bits=4, group_size=32),
                                   progress=False)
    out = tmp_path_factory.mktemp("ckpt") / "q"
    lowbit.save_quantized(model, out)
    return out


@pytest.fixture()
def ckpt(saved, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(saved, dst)
    return dst


def _edit_tensors(folder, fn):
    tensors = load_file(folder / SINGLE_FILE)
    fn(tensors)
    save_file(tensors, folder / SINGLE_FILE)


@pytest.mark.parametrize("cut", [0.05, 0.5, 0.999], ids=["head", "middle", "tail"])
def test_truncated_file(ckpt, cut):
    data = (ckpt / SINGLE_FILE).read_bytes()
    (ckpt / SINGLE_FILE).write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        lowbit.from_pretrained(ckpt)


def test_wrong_shape(ckpt):
    key = "model.layers.1.mlp.up_proj.scales"
    _edit_tensors(ckpt, lambda t: t.__setitem__(key, t[key][:1]))
    with pytest.raises(ValueError, match=rf"{key} has shape \(1, 128\), the model expects \(2, 128\)"):
        lowbit.from_pretrained(ckpt)


def test_wrong_dtype(ckpt):
    key = "model.layers.0.self_attn.k_proj.qweight"
    _edit_tensors(ckpt, lambda t: t.__setitem__(key, t[key].to(torch.int64)))
    with pytest.raises(ValueError, match=f"{key} has dtype torch.int64, the format expects torch.int32"):
        lowbit.from_pretrained(ckpt)


def test_missing_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.self_attn.o_proj.qzeros"))
    with pytest.raises(ValueError, match="missing tensors: model.layers.1.self_attn.o_proj.qzeros"):
        lowbit.from_pretrained(ckpt)


def test_unexpected_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.__setitem__("model.extra.weight", torch.ones(2)))
    with pytest.raises(ValueError, match="tensors the model does not: model.extra.weight"):
        lowbit.from_pretrained(ckpt)


def test_nan_in_checkpoint(ckpt):
    key = "model.layers.0.mlp.down_proj.scales"
    _edit_tensors(ckpt, lambda t: t[key].view(-1).__setitem__(3, float("nan")))
    with pytest.raises(ValueError, match=f"{key} contains NaN"):
        lowbit.from_pretrained(ckpt)


def test_config_mismatching_tensors(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 16
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has shape .* the model expects"):
        lowbit.from_pretrained(ckpt)


def test_unknown_quant_method_in_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "mystery"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mystery"):
        lowbit.from_pretrained(ckpt)


def test_pickle_only_folder_refused(ckpt):
    (ckpt / SINGLE_FILE).unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match="never unpickles"):
        lowbit.from_pretrained(ckpt)


def test_missing_shard(tiny_model_dir_module, tmp_path):
    model = lowbit.from_pretrained(tiny_model_dir_module, quantization_config=RtnConfig(bits=4, group_size=32),
                                   progress=False)
    lowbit.save_quantized(model, tmp_path / "s", max_shard_size=20_000)
    next((tmp_path / "s").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ValueError, match="missing shard"):
        lowbit.from_pretrained(tmp_path / "s")


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        lowbit.from_pretrained(tmp_path)


def test_failed_write_keeps_previous_checkpoint(ckpt):
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(ckpt) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert [p.name for p in ckpt.parent.iterdir()] == ["c"]


def test_completed_write_replaces_previous(ckpt):
    with atomic_folder(ckpt) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in ckpt.iterdir()] == ["config.json"]
    assert [p.name for p in ckpt.parent.iterdir()] == ["c"]


def test_refuses_to_replace_non_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a model folder"):
        with atomic_folder(tmp_path):
            pass
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_unwritable_parent(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OSError, match="cannot write"):
        with atomic_folder(blocker / "out"):
            pass
    assert blocker.read_text() == "a file where a folder should be"
