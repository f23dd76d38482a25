"""``clipforge bench``: the result's shape and keys, and the FLOP count against a hand count.

Numbers of speed are never asserted (tests do not time); counts are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipforge.bench import clipforge_side, load_bench_recipe, run_bench
from clipforge.data.loader import trim_text_padding

TINY = ["model.image_size=16", "model.patch_size=8", "model.vision_width=32", "model.vision_layers=2",
        "model.vision_heads=2", "model.text_width=32", "model.text_layers=2", "model.text_heads=2",
        "model.embed_dim=16", "model.context_length=32", "data.batch_size=8", "data.num_workers=0"]


def hand_count_train_flops(m, n: int, text_len: int) -> int:
    """Training FLOPs of one step of the plain CLIP model by hand, with FlopCounterMode's conventions:
    a matmul is 2mnk; a linear layer costs 3x its forward in training (forward, input grad, weight
    grad); the patch embedding 2x (one matmul; images need no gradient); attention 2 bmm forward and 5 in
    backward (scores recomputed), counted over the full square also when causal. A tower's last
    block computes keys and values for every token but the rest for its pooled token only."""

    def tower(tokens: int, width: int, layers: int) -> int:
        hidden = int(width * m.mlp_ratio)
        per_token = 3 * width * width + width * width + 2 * width * hidden  # qkv, out proj, MLP
        block = 3 * 2 * n * tokens * per_token + 14 * n * tokens * tokens * width
        keys_values = 2 * width * width
        last_block = 3 * 2 * n * (tokens * keys_values + per_token - keys_values) + 14 * n * 1 * tokens * width
        return (layers - 1) * block + last_block

    patches = (m.image_size // m.patch_size) ** 2
    vision = tower(patches + 1, m.vision_width, m.vision_layers)
    patch_embed = 2 * (2 * n * patches * 3 * m.patch_size**2 * m.vision_width)
    text = tower(text_len, m.text_width, m.text_layers)
    projections = 3 * 2 * n * (m.vision_width + m.text_width) * m.embed_dim
    logits = 3 * 2 * n * n * m.embed_dim  # one N x N matmul; both operands need gradients
    return vision + patch_embed + text + projections + logits

def test_flop_count_matches_a_hand_count():
    recipe = load_bench_recipe("tiny-shapes", TINY, device="cpu", precision="fp32", compile=False, batch=None)
    side, host_batch = clipforge_side(recipe, torch.device("cpu"))
    text_len = trim_text_padding(host_batch)["input_ids"].shape[1]
    assert text_len < recipe.model.context_length  # the padding was trimmed
    assert side.flops_per_step == hand_count_train_flops(recipe.model, 8, text_len)


def test_bench_result_shape_and_keys():
    result = run_bench("tiny-shapes", TINY, device="cpu", precision="fp32", steps=1, rounds=2, warmup=1,
                       against="openclip", loader_batches=2)
    for key in ("recipe", "device", "precision", "global_batch", "peak_tflops", "peak_source", "sides",
                "peak_memory_gb", "ratio_ours_over_openclip", "ratio_per_round", "loader"):
        assert key in result, key
    assert result["global_batch"] == 8 and result["precision"] == "fp32"
    assert set(result["sides"]) == {"clipforge", "openclip 3.3.0"}
    ours = result["sides"]["clipforge"]
    assert len(ours["img_per_s"]["rounds"]) == 2 and ours["img_per_s"]["median"] > 0
    assert ours["gflops_per_sample"] > 0 and 0 < ours["mfu"]
    assert ours["params"] == result["sides"]["openclip 3.3.0"]["params"]  # the same architecture
    assert result["peak_tflops"] > 0 and result["peak_source"].startswith("measured")
    assert result["loader"]["img_per_s"] > 0
    json.dumps(result)  # JSON-ready


def test_a_ratio_that_includes_bf16_residual_says_so():
    from clipforge.bench import format_table

    result = run_bench("tiny-shapes", [*TINY, "train.bf16_residual=true"], device="cpu", precision="bf16", steps=1,
                       rounds=1, warmup=0, against="openclip", loader_batches=0)
    assert result["bf16_residual"] and "clipforge only" in result["ratio_note"]
    assert "bf16 residual" in format_table(result) and "clipforge only" in format_table(result)


def test_grad_checkpointing_runs_on_both_sides_and_counts_model_flops_only(monkeypatch):
    import open_clip

    from clipforge.bench import format_table

    calls = []
    original = open_clip.model.CLIP.set_grad_checkpointing

    def recording(self, enable=True):
        calls.append(enable)
        return original(self, enable)

    monkeypatch.setattr(open_clip.model.CLIP, "set_grad_checkpointing", recording)
    kwargs = dict(device="cpu", precision="fp32", steps=1, rounds=1, warmup=0, against="openclip", loader_batches=0)
    on = run_bench("tiny-shapes", [*TINY, "train.grad_checkpointing=true"], **kwargs)
    off = run_bench("tiny-shapes", TINY, **kwargs)
    assert on["grad_checkpointing"] and calls == [True, False]  # OpenCLIP's side as ours
    assert "grad checkpointing" in format_table(on)
    # MFU counts the model's FLOPs: the recomputed forward is not counted again
    assert on["sides"]["clipforge"]["gflops_per_sample"] == off["sides"]["clipforge"]["gflops_per_sample"]


def test_against_openclip_refuses_what_openclip_cannot_run():
    from clipforge.bench import BenchError

    with pytest.raises(BenchError, match="plain CLIP / SigLIP"):
        run_bench("filip-shapes", TINY, device="cpu", steps=1, rounds=1, warmup=0, against="openclip",
                  loader_batches=0)


def test_cli_bench_prints_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "clipforge", "bench", "tiny-shapes", "--device", "cpu", "--steps", "1", "--rounds", "1",
         "--warmup", "0", "--loader-batches", "0", "--out", str(out), *[a for s in TINY for a in ("--set", s)]],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed == json.loads(out.read_text())
    assert "img/s" in proc.stderr  # the human table goes to stderr, the JSON to stdout


def test_gpu_script_refuses_unknown_cases_and_starts_nothing_past_its_deadline(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
    bad = subprocess.run([sys.executable, str(script), "--cases", "vit-b16,vit-b99", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown cases ['vit-b99']" in bad.stderr
    late = subprocess.run([sys.executable, str(script), "--device", "cpu", "--tiny", "--deadline", "0",
                           "--cases", "vit-b16-compile-bf16res-b768,vit-b16", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert late.returncode == 0, late.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [c["case"] for c in summary["cases"]] == ["vit-b16-compile-bf16res-b768", "vit-b16"]  # the asked order
    assert all(not c["ok"] and "deadline" in c["error_tail"] for c in summary["cases"])


def test_gpu_script_runs_a_case_with_extra_overrides_beside_the_case(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
    cases = "vit-b16+train.attention_backend=math,vit-b16"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--tiny", "--no-openclip", "--cases", cases,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [c["case"] for c in summary["cases"]] == cases.split(",") and all(c["ok"] for c in summary["cases"])
    extended = json.loads(Path(summary["cases"][0]["json"]).read_text())
    assert extended["attention_backend"] == "math"
    assert json.loads((tmp_path / "vit-b16.json").read_text())["attention_backend"] == "auto"
    assert list(summary["speedup_over_base_case"]) == ["vit-b16+train.attention_backend=math"]


def test_attention_backends_bench_says_which_kernel_ran_and_its_error(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "attention_backends.py"
    out = tmp_path / "attention.json"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--batch", "1", "--dtype", "fp32",
                           "--shapes", "text-t77", "--iters", "1", "--rounds", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shape = json.loads(out.read_text())["shapes"]["text-t77"]
    assert shape["causal"] and len(shape["variants"]) == 11  # 5 kernels x 2 layouts, the compiled maths packed
    v = shape["variants"]
    assert v["flash/packed"]["kernels"][0].endswith("flash_attention_for_cpu")
    assert v["math/separate"]["kernels"] == ["aten::_scaled_dot_product_attention_math", "aten::bmm"]
    assert v["cudnn/packed"]["kernels"] == v["math/packed"]["kernels"]  # no cuDNN on a CPU: the maths
    assert "aten::_scaled_dot_product_attention_math" not in v["math+compile/packed"]["kernels"]  # inductor's
    for variant in v.values():  # float32 on a CPU: each kernel against the float32 maths
        assert variant["max_relative_error"]["output"] < 1e-4 and variant["max_relative_error"]["qkv_grad"] < 1e-4
        assert variant["ms_fwd_bwd"] > 0
    assert shape["fastest"]["packed"].endswith("/packed")


def test_attention_sweep_suggests_a_kernel_only_when_it_beats_the_default():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "attention_backends.py"
    spec = importlib.util.spec_from_file_location("attention_backends", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)

    def result(ms: dict[str, float], auto_kernel: str = "cudnn") -> dict:
        kernels = {"auto": auto_kernel, "cudnn": "cudnn", "flash": "flash", "efficient": "efficient", "math": "math",
                   "math+compile": "bmm"}
        variants = {f"{k}/packed": {"ms_fwd_bwd": v, "kernels": [kernels[k]]} for k, v in ms.items()}
        variants["math/separate"] = {"ms_fwd_bwd": 0.1, "kernels": ["math"]}  # another layout: not the model's
        return {"shapes": {"vit-b16": {"variants": variants}}}

    case = "vit-b16-compile-bf16res-b768"
    assert sweep.suggested_case(result({"auto": 2.0, "cudnn": 2.0, "flash": 1.5}), case) == f"{case}+train.attention_backend=flash"
    assert sweep.suggested_case(result({"auto": 2.0, "cudnn": 2.0, "flash": 1.97}), case) == ""  # within 3 %
    assert sweep.suggested_case(result({"auto": 2.0, "cudnn": 1.8}), case) == ""  # the kernel auto ran anyway
    assert sweep.suggested_case(result({"auto": 2.0, "efficient": 2.5}), case) == ""
    # the compiled maths is what a compiled case runs with attention_backend=math
    assert sweep.suggested_case(result({"auto": 2.0, "math": 3.0, "math+compile": 1.5}), case) == f"{case}+train.attention_backend=math"


def test_bench_applies_the_attention_backend_to_both_sides_and_says_so(monkeypatch):
    import torch.nn.attention

    from clipforge.bench import format_table

    entered, original = [], torch.nn.attention.sdpa_kernel

    def recording(backends, *args, **kwargs):  # OpenCLIP's side looks it up when it is built
        entered.append(list(backends))
        return original(backends, *args, **kwargs)

    recording.__wrapped__ = original.__wrapped__  # torch._dynamo reads it when first imported
    monkeypatch.setattr(torch.nn.attention, "sdpa_kernel", recording)
    result = run_bench("tiny-shapes", [*TINY, "train.attention_backend=math"], device="cpu", precision="fp32",
                       steps=1, rounds=1, warmup=0, against="openclip", loader_batches=0)
    assert result["attention_backend"] == "math" and "attention math" in format_table(result)
    assert entered and all(b == [torch.nn.attention.SDPBackend.MATH] for b in entered)


def test_block_autotune_bench_compares_modes_on_the_same_block(tmp_path):
    """bench/block_autotune.py on a CPU: one JSON line per mode in --out, the same block and gradients in
    every mode, and the FLOP count of its matmuls and attention by hand."""
    script = Path(__file__).resolve().parents[1] / "bench" / "block_autotune.py"
    out = tmp_path / "block.jsonl"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--precision", "fp32", "--batch", "2",
                           "--tokens", "8", "--width", "32", "--heads", "2", "--iters", "1", "--warmup", "0",
                           "--modes", "eager,default", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("mode") for r in lines[:2]] == ["eager", "default"] and lines[2]["bench"] == "block_autotune"
    eager, compiled = lines[2]["results"]
    assert abs(eager["summed_input_grad_norm"] - compiled["summed_input_grad_norm"]) <= 1e-3 * eager["summed_input_grad_norm"]
    # forward: 2·N·T·12W² (QKV, output projection, two MLP matmuls) + 4·N·T²·W (scores, weighted sum); backward twice that
    assert lines[2]["flop_per_fwd_bwd"] == 3 * (2 * 2 * 8 * 12 * 32**2 + 4 * 2 * 8**2 * 32)


def test_filip_table_reads_the_experiments_evaluations_and_averages_the_seeds(tmp_path):
    """bench/filip_table.py (docs/methods/filip.md's tables) from clipforge eval result files."""
    script = Path(__file__).resolve().parents[1] / "bench" / "filip_table.py"
    for arm, seed, acc in (("filip", 0, 0.1), ("filip", 1, 0.3), ("clip", 0, 0.5)):
        for sim in ("pooled", "late-interaction"):
            for split in ("seen", "unseen"):
                (tmp_path / f"{arm}-s{seed}_zs_{split}_{sim}.json").write_text(json.dumps({"metrics": {"acc1": acc}}))
            metrics = {k: acc for k in ("binding_acc", "binding_acc_attribute_swap", "binding_acc_shape_swap",
                                        "binding_acc_relation_flip", "binding_acc_order_swap",
                                        "image_retrieval_recall@1", "text_retrieval_recall@1")}
            (tmp_path / f"{arm}-s{seed}_binding_{sim}.json").write_text(json.dumps({"metrics": metrics}))
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert "| filip | 1 | 30.0 | 30.0 | 30.0 | 30.0 |" in out
    assert "| **filip** | mean | **20.0** | **20.0** | **20.0** | **20.0** |" in out
    assert "| clip | 1 | - | - | - | - |" in out  # a missing run is shown, not skipped silently
    assert "| **filip** | late-interaction | mean | **0.200** |" in out
    empty = subprocess.run([sys.executable, str(script), str(tmp_path / "none")], capture_output=True, text=True)
    assert empty.returncode != 0 and "run bench/filip_experiment.sh first" in empty.stderr


def test_soup_table_reads_the_greedy_record_and_the_evaluations(tmp_path):
    """bench/soup_table.py (docs/methods/model-soups.md's table) from clipforge merge / eval files."""
    script = Path(__file__).resolve().parents[1] / "bench" / "soup_table.py"
    for name, acc in (("ft-a", 0.2), ("ft-b", 0.4), ("uniform", 0.1), ("greedy", 0.45), ("zs", 0.05)):
        (tmp_path / name).mkdir()
        for i, split in enumerate(("test", "seen", "unseen")):
            (tmp_path / name / f"eval-{split}.json").write_text(json.dumps({"metrics": {"acc1": acc + i / 100}}))
    record = [{"checkpoint": str(tmp_path / "ft-b/checkpoints/step_0000600"), "alone": 0.5, "soup": 0.5, "kept": True},
              {"checkpoint": str(tmp_path / "ft-a/checkpoints/step_0000600"), "alone": 0.3, "soup": 0.55, "kept": True}]
    (tmp_path / "greedy" / "config.json").write_text(json.dumps({"source": {"greedy_soup": record}}))
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert "| ft-a | 30.0 | 20.0 | 21.0 | 22.0 |" in out
    assert "| best single by held-out (ft-b) | 50.0 | 40.0 | 41.0 | 42.0 |" in out
    assert "| uniform soup (2 models) | — | 10.0 | 11.0 | 12.0 |" in out
    # a learned soup, when made: its fitted held-out accuracy, the weights that matter, its evaluations
    (tmp_path / "learned").mkdir()
    models = [{"checkpoint": str(tmp_path / "ft-a/checkpoints/step_0000600"), "alpha": 0.97},
              {"checkpoint": str(tmp_path / "ft-b/checkpoints/step_0000600"), "alpha": 0.03}]
    (tmp_path / "learned" / "config.json").write_text(json.dumps({"source": {"learned_soup": {
        "models": models, "learned": {"acc1": 0.52}, "per": "model"}}}))
    for i, split in enumerate(("test", "seen", "unseen")):
        (tmp_path / "learned" / f"eval-{split}.json").write_text(json.dumps({"metrics": {"acc1": 0.3 + i / 100}}))
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert "| learned soup (ft-a 0.97) | 52.0 | 30.0 | 31.0 | 32.0 |" in out
    assert "| greedy soup (ft-b, ft-a) | 55.0 | 45.0 | 46.0 | 47.0 |" in out
    assert "| zero-shot start | — | 5.0 | 6.0 | 7.0 |" in out
    empty = subprocess.run([sys.executable, str(script), str(tmp_path / "none")], capture_output=True, text=True)
    assert empty.returncode != 0 and "run bench/soup_experiment.sh first" in empty.stderr


def test_lit_table_reads_the_experiments_evaluations_and_averages_the_seeds(tmp_path):
    """bench/lit_table.py (docs/methods/lit-flame.md's table) from clipforge eval retrieval results."""
    script = Path(__file__).resolve().parents[1] / "bench" / "lit_table.py"
    for arm, seed, r1 in (("lit", 0, 0.02), ("lit", 1, 0.04), ("scratch", 0, 0.01)):
        for split in ("heldout", "seen"):
            metrics = {"image_retrieval_recall@1": r1, "image_retrieval_recall@5": 2 * r1, "image_retrieval_recall@10": 0.5}
            (tmp_path / f"{arm}-s{seed}_{split}.json").write_text(json.dumps({"metrics": metrics}))
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert "| lit | 1 | 4.0 / 8.0 / 50.0 | 4.0 / 8.0 / 50.0 |" in out
    assert "| **lit** | mean | **3.0 / 6.0 / 50.0** | **3.0 / 6.0 / 50.0** |" in out
    assert "| scratch | 1 | - | - |" in out  # a missing run is shown, not skipped silently
    assert "| **flame** | mean | - | - |" in out
    # --arms: another experiment's arms (bench/noncontrastive_emoji_experiment.sh), in the order given
    out = subprocess.run([sys.executable, str(script), str(tmp_path), "--arms", "scratch,lit"],
                         capture_output=True, text=True, check=True).stdout
    assert out.index("| **scratch** | mean |") < out.index("| **lit** | mean |") and "flame" not in out
    empty = subprocess.run([sys.executable, str(script), str(tmp_path / "none")], capture_output=True, text=True)
    assert empty.returncode != 0 and "run bench/lit_experiment.sh" in empty.stderr


def test_tinyclip_table_reads_curves_and_chains_the_multi_stage_student(tmp_path):
    """bench/tinyclip_table.py (docs/methods/tinyclip.md): evaluation rows of metrics.jsonl, the two stages
    of `clipforge distill` read as one student's steps 100-400, means over seeds, missing runs shown."""
    script = Path(__file__).resolve().parents[1] / "bench" / "tinyclip_table.py"

    def write(metrics: Path, steps_and_acc):
        metrics.parent.mkdir(parents=True)
        rows = [{"step": s, "loss": 1.0} for s, _ in steps_and_acc]  # training rows are skipped
        rows += [{"step": s, "zeroshot/seen/acc1": a, "zeroshot/unseen/acc1": a / 2} for s, a in steps_and_acc]
        metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    write(tmp_path / "scratch-s0" / "metrics.jsonl", [(100, 0.1), (200, 0.2), (300, 0.3), (400, 0.4)])
    write(tmp_path / "scratch-s1" / "metrics.jsonl", [(100, 0.3), (200, 0.4), (300, 0.5), (400, 0.6)])
    write(tmp_path / "multi-s0" / "stage_1" / "metrics.jsonl", [(100, 0.5), (200, 0.6)])
    write(tmp_path / "multi-s0" / "stage_2" / "metrics.jsonl", [(100, 0.7), (200, 0.8)])
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert "| scratch | 1 | 30.0 / 40.0 / 50.0 / **60.0** | 15.0 / 20.0 / 25.0 / **30.0** |" in out
    assert "| **scratch** | mean | 20.0 / 30.0 / 40.0 / **50.0** | 10.0 / 15.0 / 20.0 / **25.0** |" in out
    assert "| multi | 0 | 50.0 / 60.0 / 70.0 / **80.0** |" in out
    assert "| multi | 1 | - / - / - / **-** |" in out
    assert "| distill | 0 | - / - / - / **-** |" in out
    empty = subprocess.run([sys.executable, str(script), str(tmp_path / "none")], capture_output=True, text=True)
    assert empty.returncode != 0 and "run bench/tinyclip_experiment.sh first" in empty.stderr
