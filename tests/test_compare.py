"""lowbit compare: rows, resume, failures, the report and its plots."""

from __future__ import annotations

import json

import pytest

from lowbit.eval import compare as C
from lowbit.eval.report import write_report


def fake_row(name, label, kind, ppl, mib, acc=None, error=None):
    lm = {"error": error} if error else {
        "perplexity": ppl, "weight_bytes": mib * 2**20, "peak_bytes": 900 * 2**20, "sparsity": 0.5 if kind == "pruning" else 0.0,
        "compress_seconds": 1.0, "speed": {"prompt_len": 8, "new_tokens": 2, "prefill_s": 0.05, "prefill_spread_s": 0.01,
                                          "decode_tokens_per_s": {"1": 10.0, "4": 30.0}, "decode_spread_s": {"1": 0.0, "4": 0.0}}}
    enc = None if acc is None else {"accuracy": acc, "correct": int(acc * 872), "total": 872, "ci95": [acc - 0.03, acc + 0.03],
                                    "weight_bytes": mib * 2**19, "compress_seconds": 0.5}
    return {"name": name, "label": label, "kind": kind, "lm": lm, "encoder": enc}


def test_report_tables_plots_and_failures(tmp_path):
    pytest.importorskip("matplotlib")
    report = {"settings": C.CompareSettings().key(), "model": "SmolLM2", "torch": "2.13", "rows": [
        fake_row("fp32", "fp32 original", "baseline", 25.0, 513, 0.788),
        fake_row("rtn4", "RTN 4-bit", "quantization", 32.0, 162, 0.789),
        fake_row("wanda", "Wanda 50%", "pruning", 40.0, 513, 0.742),
        fake_row("awq4", "AWQ 4-bit", "quantization", 0, 0, error="ValueError: boom"),
        fake_row("distill", "distilled", "distillation", 120.0, 300, 0.75),
    ]}
    distilled = report["rows"][-1]
    distilled["config"] = C._config_dict(C.DISTILL)
    distilled["lm"].update(loss_curve=[9.0, 5.0, 3.0, 2.5], seconds=250.0)
    distilled["encoder"]["loss_curve"] = [0.5, 0.2, 0.1]
    path = write_report(report, tmp_path)
    text = path.read_text()
    assert "| distilled | 120.000 | 4.800 | 300.0 | 0% |" in text and "| 1.0 | 250 |" in text
    assert "trained 32 AdamW steps of 4 windows of 128 tokens" in text
    assert "| RTN 4-bit | 32.000 | 1.280 | 162.0 | 0% |" in text
    assert "| Wanda 50% | 0.742 | [0.712, 0.772] | -0.046 |" in text
    assert "failed: ValueError: boom" in text and "Failed: AWQ 4-bit" in text
    for png in ("perplexity_vs_size.png", "accuracy_vs_size.png", "speed_memory.png", "distillation_loss.png"):
        assert (tmp_path / png).stat().st_size > 10_000 and f"]({png})" in text


def test_report_with_fewshot_accuracy(tmp_path):
    pytest.importorskip("matplotlib")
    settings = C.CompareSettings(shots=4, shot_examples=200)
    rows = [fake_row("fp32", "fp32 original", "baseline", 25.0, 513, 0.788),
            fake_row("awq4", "AWQ 4-bit", "quantization", 28.0, 163),
            fake_row("old", "cached before", "quantization", 30.0, 160)]
    for row, acc in zip(rows, (0.86, 0.81)):
        row["lm"].update(fewshot_accuracy=acc, fewshot_correct=int(acc * 200), fewshot_total=200,
                         fewshot_ci95=[acc - 0.05, acc + 0.04], fewshot_auc=acc + 0.1)
    text = write_report({"settings": settings.key(), "model": "SmolLM2", "torch": "2.13", "rows": rows}, tmp_path).read_text()
    assert "| AWQ 4-bit | 28.000 | 1.120 | 0.810 [0.760, 0.850] | 0.910 | 163.0 |" in text
    assert "| cached before | 30.000 | 1.200 | - | - | 160.0 |" in text  # a row without the scores
    assert "each dev sentence (200 of them) follows 4 labelled training phrases" in text
    assert (tmp_path / "lm_accuracy_vs_size.png").stat().st_size > 10_000 and "](lm_accuracy_vs_size.png)" in text
    (tmp_path / "plain").mkdir()
    plain = write_report({"settings": C.CompareSettings().key(), "model": "m", "torch": "2.13",
                          "rows": [fake_row("fp32", "fp32 original", "baseline", 25.0, 513, 0.788)]},
                         tmp_path / "plain").read_text()
    assert "few-shot" not in plain and "| fp32 original | 25.000 | 1.000 | 513.0 |" in plain


def test_fewshot_settings_key_only_when_set():
    assert "shots" not in C.CompareSettings().key()  # rows cached before the option existed still match
    assert C.CompareSettings(shots=4).key()["shots"] == 4


def test_cli_compare_passes_shots(monkeypatch, tmp_path):
    from lowbit.cli import main

    seen = {}

    def fake_run(out, methods, settings, **kw):
        seen.update(settings=settings)
        return {"rows": []}

    monkeypatch.setattr(C, "run_compare", fake_run)
    assert main(["compare", "--out", str(tmp_path), "--methods", "rtn4", "--shots", "4", "--examples", "50"]) == 0
    assert seen["settings"].shots == 4 and seen["settings"].shot_examples == 50


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown method\\(s\\) gptq9; known: fp32, rtn8"):
        C.resolve_methods(["rtn4", "gptq9"])
    assert [m.name for m in C.resolve_methods(["rtn4"])] == ["fp32", "rtn4"]


TINY = C.CompareSettings(tokens=256, seqlen=128, nsamples=2, calib_seqlen=64, prompt_len=8, new_tokens=2,
                         batch_sizes=(1, 2), repeats=1, shots=2, shot_examples=8)


@pytest.mark.real
def test_compare_runs_resumes_and_survives_a_crash(tmp_path, monkeypatch):
    # 1 of every 7 inputs: SmolLM2's 576 inputs do not split into groups of 7, so this method fails
    broken = C.Method("broken", "broken method", "pruning", C.PruneConfig(method="magnitude", pattern="1:7"),
                      on_encoder=False)
    monkeypatch.setitem(C.METHODS, "broken", broken)
    tiny_distill = C.DistillConfig(steps=2, batch_size=1, nsamples=2, model_seqlen=32,
                                   warmup_steps=0)
    monkeypatch.setitem(C.METHODS, "distill", C.Method("distill", "distilled", "distillation", tiny_distill,
                                                       own_data=True))
    report = C.run_compare(tmp_path, ["magnitude", "broken", "distill"], TINY, progress=False)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["fp32", "magnitude", "broken", "distill"]
    assert len(rows["distill"]["lm"]["loss_curve"]) == 2 and len(rows["distill"]["encoder"]["loss_curve"]) == 2
    assert rows["distill"]["lm"]["weight_bytes"] < rows["fp32"]["lm"]["weight_bytes"]
    assert rows["distill"]["encoder"]["weight_bytes"] < rows["fp32"]["encoder"]["weight_bytes"]
    assert all(r[p]["seconds"] > 0 for r in rows.values() for p in ("lm", "encoder") if r[p] and "error" not in r[p])
    assert rows["magnitude"]["lm"]["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert rows["magnitude"]["lm"]["perplexity"] > rows["fp32"]["lm"]["perplexity"]
    for name in ("fp32", "magnitude", "distill"):
        lm = rows[name]["lm"]
        assert lm["fewshot_total"] == 8 and lm["fewshot_accuracy"] == lm["fewshot_correct"] / 8
        assert lm["fewshot_ci95"][0] <= lm["fewshot_accuracy"] <= lm["fewshot_ci95"][1]
    assert 0.6 < rows["fp32"]["encoder"]["accuracy"] < 0.9
    assert rows["broken"]["lm"]["error"].startswith("ValueError:") and "groups of 7" in rows["broken"]["lm"]["error"]
    assert rows["broken"]["encoder"] is None
    assert (tmp_path / "report.md").is_file() and json.loads((tmp_path / "results.json").read_text())["rows"]

    # a second run reuses the finished rows instead of recomputing them
    def no_rerun(*a, **k):
        raise AssertionError("recomputed a cached row")

    monkeypatch.setattr(C, "_lm_row", no_rerun)
    monkeypatch.setattr(C, "_encoder_row", no_rerun)
    again = C.run_compare(tmp_path, ["magnitude"], TINY, progress=False)
    assert [r["name"] for r in again["rows"]] == ["fp32", "magnitude"]


def test_cli_compare_list_and_cpu_only(capsys):
    from lowbit.cli import main

    assert main(["compare", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "sparsegpt24" in listed and "AQLM 2x8 g8  (only when named)" in listed
    assert "aqlm2x8" not in [m.name for m in C.resolve_methods(None)]
    assert [m.name for m in C.resolve_methods(["aqlm2x8"])] == ["fp32", "aqlm2x8"]
    assert main(["--device", "meta", "compare", "--methods", "rtn4"]) == 2
    assert "compare runs on cpu for now" in capsys.readouterr().err


def test_demo_compare_prints_both_tables(monkeypatch, capsys):
    from lowbit.cli import main

    seen = {}

    def fake_run(out, methods, settings, **kw):
        seen.update(methods=methods, settings=settings)
        return {"rows": [fake_row("fp32", "fp32 original", "baseline", 25.0, 513, 0.788),
                         fake_row("rtn4", "RTN 4-bit", "quantization", 32.0, 162, 0.789)]}

    monkeypatch.setattr(C, "run_compare", fake_run)
    assert main(["demo", "--compare"]) == 0
    printed = capsys.readouterr().out
    assert seen["methods"] == C.DEMO_METHODS and seen["settings"].batch_sizes == (1,)
    assert "| RTN 4-bit | 32.000 | 1.280 |" in printed and "| RTN 4-bit | 0.789 |" in printed
