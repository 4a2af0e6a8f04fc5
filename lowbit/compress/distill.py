"""Distillation baseline: a shallower student, cut from the teacher and trained to match it.

The student keeps ``student_layers`` of the teacher's blocks, evenly spaced from the first to
the last (half of them by default, close to DistilBERT's every-other-layer initialisation).
Everything else (embeddings, final norm, head) starts as the teacher's; the token embeddings
(and an output head tied to them) stay frozen, which saves a vocabulary-sized gradient per step.
It is then trained to match the teacher on calibration text:

* causal LM: KL(teacher || student) on the next-token distributions, both softened by
  ``temperature`` and scaled by ``temperature**2`` (Hinton et al., 2015);
* encoder: on the mean-pooled sentence embedding (the pooling sentence-transformers uses),
  ``MSE + (1 - cosine)``.

The budget is ``steps`` AdamW steps of ``batch_size`` windows of ``model_seqlen`` tokens, drawn
from a pool of ``nsamples`` calibration windows with a seeded generator, so a run is
reproducible. The student is an ordinary model of the same class with a smaller
``num_hidden_layers``: it saves and loads as a plain checkpoint.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.methods.walk import find_blocks

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """How to cut and train the student.

    ``student_layers=None``: half the teacher's blocks, rounded up. The learning rate decays
    linearly to zero over ``steps`` after ``warmup_steps`` of linear warm-up.
    """

    student_layers: int | None = None
    steps: int = 100
    batch_size: int = 4
    nsamples: int = 256
    model_seqlen: int | None = 128
    learning_rate: float = 5e-4
    warmup_steps: int = 10
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.student_layers is not None and self.student_layers < 1:
            raise ValueError(f"student_layers={self.student_layers} must be >= 1 (or None for half the teacher's)")
        for name in ("steps", "batch_size", "nsamples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.model_seqlen is not None and self.model_seqlen < 2:
            raise ValueError(f"model_seqlen={self.model_seqlen} must be >= 2")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate={self.learning_rate} must be a positive number")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0 and below steps={self.steps}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature={self.temperature} must be a positive number")

    @property
    def quant_method(self) -> str:
        """The method's name where shared code names the config's method (e.g. calibration errors)."""
        return "distillation"

    def label(self) -> str:
        layers = "half the layers" if self.student_layers is None else f"{self.student_layers} layers"
        return f"distilled, {layers}, {self.steps} steps"


def student_layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
    """Which teacher blocks the student keeps: ``student_layers`` evenly spaced indices from 0 to
    ``teacher_layers - 1``, halves rounded up (e.g. 30 -> 15: 0, 2, ..., 12, 15, 17, ..., 27, 29;
    6 -> 3: 0, 3, 5)."""
    if not 1 <= student_layers < teacher_layers:
        raise ValueError(f"a student needs between 1 and {teacher_layers - 1} layers (the teacher has "
                         f"{teacher_layers}), got student_layers={student_layers}")
    if student_layers == 1:
        return [0]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [math.floor(i * step + 0.5) for i in range(student_layers)]


def cut_student(model: nn.Module, indices: list[int]) -> None:
    """Keep only the blocks at ``indices`` of ``model``'s block list, in place.

    Renumbers the ``layer_idx`` attributes the kv-cache reads, and shortens the config's
    ``num_hidden_layers`` and any per-layer list (``layer_types``), so the model saves and
    reloads as a shallower model of the same class.
    """
    name, blocks = find_blocks(model)
    kept = nn.ModuleList([blocks[i] for i in indices])
    for new_idx, block in enumerate(kept):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_idx
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, kept)
    config = model.config
    teacher_layers = config.num_hidden_layers
    config.num_hidden_layers = len(indices)
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == teacher_layers and key.startswith("layer"):
            setattr(config, key, [value[i] for i in indices])


def is_causal_lm(model: nn.Module) -> bool:
    """Whether the model predicts tokens (has an output embedding) rather than encoding them."""
    return model.get_output_embeddings() is not None


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over tokens; logits ``[B, T, V]``."""
    s = F.log_softmax(student.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [B, T, D]`` over the tokens where ``mask [B, T]`` is 1 -> ``[B, D]``."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``MSE + (1 - cosine)`` between pooled embeddings ``[B, D]``, averaged over the batch."""
    s, t = student.float(), teacher.float()
    return F.mse_loss(s, t) + (1 - F.cosine_similarity(s, t, dim=-1)).mean()


def _loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, causal: bool, temperature: float) -> torch.Tensor:
    mask = torch.ones_like(ids)
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=mask)
    s_out = student(input_ids=ids, attention_mask=mask)
    if causal:
        return logit_kl(s_out.logits, t_out.logits, temperature)
    return embedding_loss(mean_pool(s_out.last_hidden_state, mask), mean_pool(t_out.last_hidden_state, mask))


def _lr_factor(step: int, config: DistillConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    return max(0.0, (config.steps - step) / (config.steps - config.warmup_steps))


def distill(model: nn.Module, config: DistillConfig, calib=None, *, tokenizer=None, device=None,
            progress: bool = True, losses: list[float] | None = None) -> nn.Module:
    """Turn ``model`` into its distilled student in place and return it.

    Args:
        model: a transformers causal LM or encoder (any architecture with a list of blocks); a
            frozen copy of it is the teacher while training.
        calib: training text as for :func:`lowbit.quantize` (token ids ``[nsamples, seqlen]``, a
            text file, strings, or None for the embedded WikiText-2 validation text).
        losses: if given, the training loss of every step is appended to it (the loss curve).
    """
    from tqdm.auto import tqdm

    from lowbit.api import CONFIG_ATTR, _calibration_ids, resolve_device

    if getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError("model is quantized: distill the original model (quantize the student afterwards)")
    _, blocks = find_blocks(model)
    indices = student_layer_indices(len(blocks), config.student_layers or math.ceil(len(blocks) / 2))
    pool = _calibration_ids(calib, tokenizer, config)  # [P, T]
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    causal = is_causal_lm(model)
    teacher = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    cut_student(model, indices)
    model.to(device).eval()  # dropout off: a short budget matches the teacher better without it
    model.get_input_embeddings().requires_grad_(False)  # shared with the teacher; a tied head stays too
    gen = torch.Generator().manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, config))
    bar = tqdm(range(config.steps), desc=f"distilling {len(blocks)} -> {len(indices)} layers", disable=not progress)
    try:
        for _ in bar:
            rows = torch.randint(pool.shape[0], (config.batch_size,), generator=gen)
            loss = _loss(model, teacher, pool[rows].to(device), causal, config.temperature)
            if not torch.isfinite(loss):
                raise ValueError(f"distillation loss became {loss.item()}; lower learning_rate "
                                 f"(now {config.learning_rate})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if losses is not None:
                losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
    finally:
        opt.zero_grad(set_to_none=True)
    log.info("distilled %d -> %d layers (kept %s) in %d steps", len(blocks), len(indices), indices, config.steps)
    return model


def save_distilled(model: nn.Module, path, config: DistillConfig, tokenizer=None, losses: list[float] | None = None):
    """Save a student as a plain checkpoint (atomically), noting the distillation (and its loss
    curve) in ``config.json`` under ``lowbit_distillation``."""
    import dataclasses

    from lowbit.checkpoint.loading import save_plain

    note = dataclasses.asdict(config)
    if losses:
        note["loss"] = [round(v, 5) for v in losses]
    model.config.lowbit_distillation = note
    return save_plain(model, path, tokenizer)
