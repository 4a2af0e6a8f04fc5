"""The block-by-block calibration runner."""

import pytest
import torch
from torch import nn

from lowbit.config import RtnConfig
from lowbit.kernels import exact_kernels
from lowbit.methods.calibration import capture_block_inputs, quantize_blockwise
from lowbit.methods.rtn import RtnQuantizer
from lowbit.methods.walk import find_blocks, find_linears, matches

from conftest import tiny_llama_model


class _CountingStats:
    def __init__(self):
        self.rows = 0
        self.inputs = []

    def add_batch(self, x):
        self.rows += x.reshape(-1, x.shape[-1]).shape[0]
        self.inputs.append(x.clone())


class _RecordingRtn(RtnQuantizer):
    """RTN that asks for calibration and records what each linear was fed."""

    requires_calibration = True

    def __init__(self, config):
        super().__init__(config)
        self.seen = {}  # what collect was asked for: one per input group
        self.given = {}  # the stats each linear was quantized with

    def collect(self, name, linear):
        return self.seen.setdefault(name, _CountingStats())

    def quantize_layer(self, name, linear, stats):
        self.given[name] = stats
        return super().quantize_layer(name, linear, stats)


def _ids(n=3, t=11):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(5))


def test_find_blocks_and_linears():
    model = tiny_llama_model()
    prefix, blocks = find_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 2
    assert sorted(find_linears(blocks[0])) == sorted(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])


def test_find_blocks_without_block_list_raises():
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("name,pattern,hit", [
    ("lm_head", "lm_head", True), ("model.layers.1.mlp.up_proj", "mlp", True),
    ("model.layers.10.mlp.up_proj", "layers.1", False), ("model.layers.0.mlp.up_proj", "proj", False),
    ("model.layers.0.mlp.up_proj", "layers.0.mlp.up_proj", True)])
def test_skip_patterns_match_whole_components(name, pattern, hit):
    assert matches(name, [pattern]) is hit


def test_captured_inputs_equal_embeddings():
    model = tiny_llama_model()
    ids = _ids()
    _, blocks = find_blocks(model)
    states, kwargs = capture_block_inputs(model, blocks[0], ids, torch.device("cpu"))
    assert len(states) == 3
    for row, h in zip(ids, states):
        assert torch.equal(h, model.model.embed_tokens(row[None]))
    assert "position_embeddings" in kwargs


def test_runner_feeds_every_linear_and_matches_full_forward():
    model = tiny_llama_model()
    ids = _ids()
    quantizer = _RecordingRtn(RtnConfig(bits=8, group_size=-1))
    quantize_blockwise(model, quantizer, ids, "cpu", progress=False)
    assert len(quantizer.given) == 14  # every linear, with the stats of its input group:
    assert sorted(quantizer.seen) == sorted(f"model.layers.{i}.{n}" for i in range(2) for n in (
        "self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"))
    assert all(s.rows == 3 * 11 for s in quantizer.given.values())
    blk = "model.layers.0."
    assert quantizer.given[blk + "self_attn.v_proj"] is quantizer.given[blk + "self_attn.q_proj"]
    assert quantizer.given[blk + "mlp.up_proj"] is quantizer.given[blk + "mlp.gate_proj"]
    # the second block saw the outputs of the already-quantized first block (run, as calibration
    # runs it, without kernels that narrow the dtype: 8 bits take the bf16 cpu-int4 otherwise)
    reference = tiny_llama_model()
    with torch.no_grad(), exact_kernels():
        reference.model.layers[0] = model.model.layers[0]  # quantized block 0, fp block 1
        captured = []
        hook = reference.model.layers[1].self_attn.q_proj.register_forward_hook(
            lambda m, a, o: captured.append(a[0]))
        for row in ids:
            reference(row[None], use_cache=False)
        hook.remove()
    fed = quantizer.given["model.layers.1.self_attn.k_proj"].inputs
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fed, captured))


def test_runner_matches_weights_only_rtn():
    """RTN through the runner gives the same modules as RTN applied layer by layer."""
    a, b = tiny_llama_model(), tiny_llama_model()
    quantize_blockwise(a, _RecordingRtn(RtnConfig(bits=4, group_size=32)), _ids(), "cpu", progress=False)
    q = RtnQuantizer(RtnConfig(bits=4, group_size=32))
    for name, lin in find_linears(b.model.layers).items():
        assert torch.equal(a.model.layers.get_submodule(name).qweight, q.quantize_layer(name, lin, None).qweight)
