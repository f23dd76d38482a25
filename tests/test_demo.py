"""The demo pipeline (calibrated steps, eval hook, eval.json, report.html) and the shipped recipes."""

import json
import re

import pytest
import torch

from clipforge.config import available_recipes, load_recipe
from clipforge.demo import run_demo

SMALL = ["model.vision_width=32", "model.vision_layers=2", "model.vision_heads=2", "model.text_width=32",
         "model.embed_dim=32", "data.batch_size=32", "data.num_workers=0", "data.shapes.eval_samples_per_class=2",
         "logging.progress=false", "train.threads=1"]


@pytest.mark.slow
def test_demo_writes_eval_json_and_a_self_contained_report(tmp_path):
    summary = run_demo(tmp_path / "demo", minutes=0.15, overrides=SMALL)
    saved = json.loads((tmp_path / "demo" / "eval.json").read_text())
    for split in ("seen", "unseen"):
        assert 0.0 <= saved[f"zeroshot/{split}/acc1"] <= 1.0
        assert saved[f"zeroshot/{split}/acc5"] >= saved[f"zeroshot/{split}/acc1"]
    assert saved["steps"] >= 1 and summary["report"].endswith("report.html")
    html = (tmp_path / "demo" / "report.html").read_text()
    # curves, zero-shot over training, two confusion matrices, retrieval thumbnails: all inlined
    assert len(re.findall(r"src='data:image/png;base64,", html)) >= 4 + 8 * 6
    assert "http://" not in html and "https://" not in html
    evals = [json.loads(l) for l in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()
             if "zeroshot/unseen/acc1" in l]
    assert len(evals) >= 2  # periodic hook + final evaluation


@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_every_shipped_recipe_builds_and_takes_a_step(name):
    from clipforge.train.trainer import build_step

    r = load_recipe(name)
    if any(t.kind != "ema" for t in r.teachers):  # the teacher run a recipe points at is not here: an ema copy stands in
        r = load_recipe(name, ["teachers=[" + ", ".join(f'{{name="{t.name}", kind="ema"}}' for t in r.teachers) + "]"])
    step = build_step(r, torch.device("cpu"), log=False).train()  # the trainer's own step module
    if r.data.train == "shapes":  # the recipe's own first batch (caption lists, noise kinds, sub-captions)
        from clipforge.data.loader import build_train_loader
        from clipforge.models.tokenizer import tokenizer_for_recipe

        r = load_recipe(name, ["data.batch_size=4", "data.num_workers=0", "data.tokenizer.corpus_size=300"]
                        + [f"teachers.{i}.kind=ema" for i, t in enumerate(r.teachers) if t.kind != "ema"])
        batch = next(build_train_loader(r.data, r.model.image_size, tokenizer_for_recipe(r)))
    else:  # data on disk the test does not have: random pixels and token ids
        images = torch.randint(0, 256, (2, 3, r.model.image_size, r.model.image_size), dtype=torch.uint8)
        ids = torch.randint(4, 100, (2, r.model.context_length))
        batch = {"images": images, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if r.data.ssl_views:  # SLIP's self-supervised views, as the workers would add them
            batch["views"] = torch.randint(0, 256, (2, r.data.ssl_views, *images.shape[1:]), dtype=torch.uint8)
        if r.data.text_views:  # CLIP 🚀's text views: A token rows per sample
            view_ids = torch.randint(4, 100, (2 * r.data.text_views, r.model.context_length))
            batch["text_view_input_ids"], batch["text_view_attention_mask"] = view_ids, torch.ones_like(view_ids)
    loss, _ = step.compute_loss(step(batch), batch)
    loss.backward()
    assert torch.isfinite(loss) and step.model.logit_scale.grad is not None


def test_the_demo_replaces_only_its_own_folders_and_checks_its_arguments_first(tmp_path):
    from clipforge.config import RecipeError
    from clipforge.demo import DEMO_MARK, clear_demo_dir

    run = tmp_path / "t1"  # a training run (recipe.toml, a checkpoint) that a user points the demo at
    (run / "checkpoints" / "step_0000002").mkdir(parents=True)
    (run / "recipe.toml").write_text('base = "tiny-shapes"\n')
    with pytest.raises(RecipeError, match="train.stepz"):
        run_demo(run, minutes=0.1, overrides=["train.stepz=1"])
    with pytest.raises(RecipeError, match="--minutes .* must be positive"):
        run_demo(run, minutes=-1)
    with pytest.raises(FileExistsError, match="is a training run; the demo replaces only its own folders"):
        run_demo(run, minutes=0.1, overrides=SMALL)
    assert (run / "checkpoints" / "step_0000002").is_dir()  # nothing was lost
    earlier = tmp_path / "demo"  # an earlier demo's folder (its mark) is replaced
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / DEMO_MARK).write_text("")
    clear_demo_dir(earlier)
    assert not earlier.exists()
    older = tmp_path / "old-demo"  # a demo from before the mark: its eval.json summary says so
    older.mkdir()
    (older / "eval.json").write_text(json.dumps({"steps": 3, "train_and_eval_seconds": 1.0}))
    clear_demo_dir(older)
    assert not older.exists()
