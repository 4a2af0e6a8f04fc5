"""``report.md`` and PNG plots from ``lowbit compare``'s results (matplotlib: the ``eval`` extra)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from lowbit.checkpoint.safetensors_io import atomic_write

log = logging.getLogger(__name__)

STAGGER = ((5, 4), (5, -10), (-28, 6), (-28, -10))  # label offsets in points, cycled along the x axis
KIND_STYLE = {"baseline": ("black", "*"), "quantization": ("tab:blue", "o"), "pruning": ("tab:orange", "s"),
              "distillation": ("tab:green", "^")}


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _total(part: dict) -> str:
    """The row's wall time (load, compress, evaluate); rows cached before it was recorded have none."""
    return f"{part['seconds']:.0f}" if "seconds" in part else "-"


def _ok(row: dict, part: str) -> bool:
    return isinstance(row.get(part), dict) and "error" not in row[part]


def failed_labels(rows: list[dict]) -> list[str]:
    """Labels of the methods that raised on the causal LM or on the encoder."""
    return [r["label"] for r in rows if any(isinstance(r.get(p), dict) and "error" in r[p] for p in ("lm", "encoder"))]


def _has_fewshot(rows: list[dict]) -> bool:
    """Whether any causal-LM row carries a few-shot accuracy (``lowbit compare --shots``)."""
    return any(_ok(r, "lm") and "fewshot_accuracy" in r["lm"] for r in rows)


def _fewshot_cell(lm: dict) -> str:
    if "fewshot_accuracy" not in lm:  # a row cached before the run asked for it
        return "-"
    lo, hi = lm["fewshot_ci95"]
    return f"{lm['fewshot_accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


def _auc_cell(lm: dict) -> str:
    return f"{lm['fewshot_auc']:.3f}" if "fewshot_auc" in lm else "-"  # rows cached before AUCs were kept


def lm_table(rows: list[dict]) -> str:
    base = next((r["lm"] for r in rows if r["name"] == "fp32" and _ok(r, "lm")), None)
    batches = sorted({b for r in rows if _ok(r, "lm") for b in r["lm"]["speed"]["decode_tokens_per_s"]}, key=int)
    shots = _has_fewshot(rows)
    head = ["method", "perplexity", "vs fp32", *(["SST-2 few-shot [95% CI]", "SST-2 AUC"] if shots else []),
            "weights MiB", "zero weights", "peak MiB", "prefill ms", *[f"decode tok/s (batch {b})" for b in batches], "compress s",
            "total s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lm = r.get("lm")
        if not _ok(r, "lm"):
            lines.append(f"| {r['label']} | failed: {lm['error'] if lm else 'not run'} |" + " |" * (len(head) - 2))
            continue
        sp = lm["speed"]
        ratio = f"{lm['perplexity'] / base['perplexity']:.3f}" if base else "-"
        lines.append("| " + " | ".join([
            r["label"], f"{lm['perplexity']:.3f}", ratio, *([_fewshot_cell(lm), _auc_cell(lm)] if shots else []),
            _mib(lm["weight_bytes"]), f"{lm['sparsity']:.0%}",
            _mib(lm["peak_bytes"]), f"{1e3 * sp['prefill_s']:.0f}",
            *[f"{sp['decode_tokens_per_s'][b]:.1f}" for b in batches], f"{lm['compress_seconds']:.1f}", _total(lm)]) + " |")
    return "\n".join(lines)


def encoder_table(rows: list[dict]) -> str:
    base = next((r["encoder"] for r in rows if r["name"] == "fp32" and _ok(r, "encoder")), None)
    lines = ["| method | SST-2 accuracy | 95% CI | vs fp32 | weights MiB | compress s | total s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        enc = r.get("encoder")
        if enc is None:
            lines.append(f"| {r['label']} | not applicable | | | | | |")
        elif "error" in enc:
            lines.append(f"| {r['label']} | failed: {enc['error']} | | | | | |")
        else:
            lo, hi = enc["ci95"]
            delta = f"{enc['accuracy'] - base['accuracy']:+.3f}" if base else "-"
            lines.append(f"| {r['label']} | {enc['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | {delta} | "
                         f"{_mib(enc['weight_bytes'])} | {enc['compress_seconds']:.1f} | {_total(enc)} |")
    return "\n".join(lines)


def plot(report: dict, out: Path) -> list[str]:
    """Write the PNG plots into ``out``; returns their file names (none without matplotlib)."""
    if importlib.util.find_spec("matplotlib") is None:
        log.warning("matplotlib is not installed (pip install lowbit[eval]): report without plots")
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = []

    def scatter(part: str, value: str, ylabel: str, fname: str, title: str, err: str | None = None,
                log_y=False) -> None:
        """``err``: the key of each point's 95 % interval."""
        fig, ax = plt.subplots(figsize=(7, 4.5))
        pts = [r for r in rows if _ok(r, part) and value in r[part]]
        for kind, (color, marker) in KIND_STYLE.items():
            sel = [r for r in pts if r["kind"] == kind]
            if not sel:
                continue
            xs = [r[part]["weight_bytes"] / 2**20 for r in sel]
            ys = [r[part][value] for r in sel]
            if err:
                lo = [y - r[part][err][0] for y, r in zip(ys, sel)]
                hi = [r[part][err][1] - y for y, r in zip(ys, sel)]
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt=marker, color=color, label=kind, capsize=3)
            else:
                ax.scatter(xs, ys, color=color, marker=marker, label=kind, s=45)
        # short names (the tables give the full labels), staggered so neighbours stay readable
        for i, r in enumerate(sorted(pts, key=lambda r: (r[part]["weight_bytes"], r[part][value]))):
            ax.annotate(r["name"], (r[part]["weight_bytes"] / 2**20, r[part][value]), textcoords="offset points",
                        xytext=STAGGER[i % len(STAGGER)], fontsize=7)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("weights in memory (MiB)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(out / fname, lambda tmp: fig.savefig(tmp, dpi=120))
        plt.close(fig)
        names.append(fname)

    scatter("lm", "perplexity", "WikiText-2 perplexity, log scale (lower is better)", "perplexity_vs_size.png",
            "Causal LM: perplexity against size", log_y=True)
    if any(_ok(r, "encoder") for r in rows):
        scatter("encoder", "accuracy", "SST-2 dev accuracy (95% CI)", "accuracy_vs_size.png",
                "Encoder: SST-2 accuracy against size", err="ci95")
    if _has_fewshot(rows):
        scatter("lm", "fewshot_accuracy", f"SST-2 {report['settings'].get('shots')}-shot accuracy (95% CI)",
                "lm_accuracy_vs_size.png", "Causal LM: few-shot SST-2 accuracy against size", err="fewshot_ci95")

    lm_rows = [r for r in rows if _ok(r, "lm")]
    if lm_rows:
        batches = sorted(lm_rows[0]["lm"]["speed"]["decode_tokens_per_s"], key=int)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        width = 0.8 / len(batches)
        idx = range(len(lm_rows))
        for j, b in enumerate(batches):
            axes[0].bar([i + j * width for i in idx], [r["lm"]["speed"]["decode_tokens_per_s"][b] for r in lm_rows],
                        width, label=f"batch {b}")
        axes[0].set_ylabel("decode tokens/s (higher is better)")
        axes[0].set_title("Decode throughput")
        axes[0].legend()
        axes[1].bar(list(idx), [r["lm"]["peak_bytes"] / 2**20 for r in lm_rows],
                    color=[KIND_STYLE[r["kind"]][0] for r in lm_rows])
        axes[1].set_ylabel("peak memory (MiB)")
        axes[1].set_title("Peak memory while compressing and evaluating")
        from matplotlib.patches import Patch

        kinds = sorted({r["kind"] for r in lm_rows})
        axes[1].legend(handles=[Patch(color=KIND_STYLE[k][0], label=k) for k in kinds])
        for ax in axes:
            ax.set_xticks([i + 0.4 - width / 2 if ax is axes[0] else i for i in idx])
            ax.set_xticklabels([r["label"] for r in lm_rows], rotation=45, ha="right", fontsize=7)
            ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        atomic_write(out / "speed_memory.png", lambda tmp: fig.savefig(tmp, dpi=120))
        plt.close(fig)
        names.append("speed_memory.png")
    curves = [(r["label"], part, r[part]["loss_curve"]) for r in rows for part in ("lm", "encoder")
              if _ok(r, part) and r[part].get("loss_curve")]
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
        for ax, (label, part, losses) in zip(axes[0], curves):
            ax.plot(range(1, len(losses) + 1), losses, color=KIND_STYLE["distillation"][0])
            ax.set_xlabel("training step")
            ax.set_ylabel("KL divergence to the teacher (nats/token)" if part == "lm"
                          else "MSE + (1 - cosine) of pooled embeddings")
            ax.set_title(f"{label}: {'causal LM' if part == 'lm' else 'encoder'}")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write(out / "distillation_loss.png", lambda tmp: fig.savefig(tmp, dpi=120))
        plt.close(fig)
        names.append("distillation_loss.png")
    return names


def _distill_note(rows: list[dict]) -> list[str]:
    """A sentence on each distilled row's budget (its config, as recorded in the row)."""
    lines = []
    for r in rows:
        cfg = r.get("config")
        if r["kind"] != "distillation" or not cfg:
            continue
        lines.append(f"{r['label']}: the student keeps {cfg['student_layers'] or 'half'} of the teacher's blocks, evenly "
                     f"spaced, and is trained {cfg['steps']} AdamW steps of {cfg['batch_size']} windows of "
                     f"{cfg['model_seqlen']} tokens (drawn from {cfg['nsamples']} windows of WikiText-2 valid) to match "
                     "the teacher: KL on next-token distributions for the causal LM, MSE + (1 - cosine) on mean-pooled "
                     "embeddings for the encoder. Its size is that of the fp32 student.")
    return [*lines, ""] if lines else []


def write_report(report: dict, out: Path) -> Path:
    """``out/report.md`` with the tables and the plots."""
    s = report["settings"]
    rows = report["rows"]
    pngs = plot(report, out)
    failed = failed_labels(rows)
    runs = "one timed run" if s["repeats"] == 1 else f"median of {s['repeats']} timed runs"
    parts = [
        "# lowbit compare: quantization against pruning and distillation",
        "",
        f"Causal LM: {Path(report['model']).name}, WikiText-2 test perplexity over {s['tokens']} tokens "
        f"({s['seqlen']}-token windows). Calibration: {s['nsamples']} windows of {s['calib_seqlen']} tokens of "
        f"WikiText-2 valid (seed {s['seed']}), the same for every method. Speed: prompt of {s['prompt_len']} "
        f"random tokens, {s['new_tokens']} greedy tokens per sequence, "
        f"{runs} after a warm-up "
        f"(torch {report['torch']}). Pruned models are stored dense (a 50 % sparse matrix in CSR would be larger), "
        "so their size does not shrink; their zeros could only pay off in sparse kernels.",
        "",
        *_distill_note(rows),
        *([f"Few-shot SST-2: each dev sentence ({s['shot_examples'] or 872} of them) follows {s['shots']} labelled "
           "training phrases, and the label whose word (\" positive\" / \" negative\") the LM finds likelier wins; "
           "95 % Wilson intervals. The AUC is the chance that a positive sentence gets higher odds of "
           "\" positive\" than a negative one: it ignores the model's lean towards either word, which "
           "compression can shift.", ""] if s.get("shots") is not None else []),
        lm_table(rows),
        "",
    ]
    if s.get("encoder"):
        parts += ["Encoder: the embedded all-MiniLM-L6-v2, SST-2 dev accuracy (872 sentences) through a probe trained "
                  "once on the fp32 encoder and held fixed; 95 % Wilson intervals.", "", encoder_table(rows), ""]
    if failed:
        parts += [f"Failed: {', '.join(failed)} (see results.json for the errors).", ""]
    parts += [f"![{p}]({p})" for p in pngs] or ["(no plots: matplotlib is not installed)"]
    path = out / "report.md"
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(parts) + "\n"))
    return path
