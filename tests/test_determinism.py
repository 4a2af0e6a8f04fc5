"""Determinism: the same model, data and seed give a byte-identical checkpoint on one machine,
for every method (their calibration windows, k-means starts and beam searches are all seeded)."""

from __future__ import annotations

import pytest

import lowbit
from conftest import calib_ids, folder_digest

CONFIGS = {
    "rtn": lowbit.RtnConfig(bits=4, group_size=32, sym=False),
    "gptq-act-order": lowbit.GPTQConfig(bits=3, group_size=32, desc_act=True, sym=False),
    "awq": lowbit.AwqConfig(bits=4, group_size=32),
    "int8": lowbit.BitsAndBytesConfig(load_in_8bit=True),
    "nf4-double-quant": lowbit.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                  bnb_4bit_use_double_quant=True),
    "aqlm": lowbit.AqlmConfig(num_codebooks=2, nbits_per_codebook=4, in_group_size=8, max_iterations=2, seed=3),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_inputs_same_bytes(tiny_model_dir_module, tmp_path, name):
    outs = []
    for run in range(2):
        model = lowbit.from_pretrained(tiny_model_dir_module, quantization_config=CONFIGS[name],
                                       calib=calib_ids(8, 32), progress=False)
        outs.append(lowbit.save_quantized(model, tmp_path / f"run{run}"))
    first, second = (folder_digest(o) for o in outs)
    assert "model.safetensors" in first and first == second
