"""Which linears AWQ scales together, and where it folds the inverse scale: data per block class.

Each :class:`ScaleGroup` names, relative to one transformer block, linears that read the same
input, the op that produces that input (``prev``: a norm, whose weight/bias are divided by the
scale, or a linear, whose output rows are), and the submodule whose output the scale search
compares (``inspect``: it must take the group's input as its first argument). A group whose
``prev`` is a linear is used only when the scale can be folded exactly: the prev linear's last
``K`` outputs are the group's inputs (``K`` = the group's in_features) and nothing nonlinear
sits between them, which the table vouches for. ``no_clip`` lists linears whose weight range is
never clipped (query/key projections, whose errors the softmax amplifies).

Add an architecture by adding its block class name here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScaleGroup:
    prev: str
    linears: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class BlockMap:
    groups: tuple[ScaleGroup, ...]
    no_clip: tuple[str, ...] = ()


_LLAMA = BlockMap(
    groups=(
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),  # MHA only (shapes)
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),  # act(gate) * up is linear in up
    ),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
)

_OPT = BlockMap(
    groups=(
        ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
        ScaleGroup("final_layer_norm", ("fc1",), "fc1"),
        ScaleGroup("fc1", ("fc2",), "fc2"),  # ReLU commutes with a positive scale
    ),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
)

_GPT2 = BlockMap(
    groups=(
        ScaleGroup("ln_1", ("attn.c_attn",), "attn"),
        ScaleGroup("attn.c_attn", ("attn.c_proj",), "attn.c_proj"),  # the last third of c_attn is v
        ScaleGroup("ln_2", ("mlp.c_fc",), "mlp"),
        # mlp.c_proj: GELU sits between c_fc and c_proj, so no scale can be folded; it is clipped only
    ),
    no_clip=("attn.c_attn",),
)

BLOCK_MAPS: dict[str, BlockMap] = {
    "LlamaDecoderLayer": _LLAMA,  # also SmolLM2, the embedded model
    "MistralDecoderLayer": _LLAMA,
    "Qwen2DecoderLayer": _LLAMA,
    "Qwen3DecoderLayer": _LLAMA,
    "OPTDecoderLayer": _OPT,
    "GPT2Block": _GPT2,
}


def block_map(block_class: str) -> BlockMap:
    """The map of a block class; ``ValueError`` naming where to add one if there is none."""
    try:
        return BLOCK_MAPS[block_class]
    except KeyError:
        known = ", ".join(sorted(BLOCK_MAPS))
        raise ValueError(f"AWQ does not know which linears of a {block_class} share an input; add a BlockMap "
                         f"for it in lowbit/methods/awq_maps.py (known: {known})") from None
