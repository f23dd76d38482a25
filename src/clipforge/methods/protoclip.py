"""ProtoCLIP: prototypical contrastive language-image pre-training (Chen et al.; methods.md section 5).

Training runs in **episodes** of ``episode_steps`` optimiser steps. An episode's samples are the
next ``episode_steps x accum_steps x batch_size x world_size`` samples of the training stream (the
stream is already shuffled or resampled with replacement, so an episode is a random draw of the
dataset, as the paper's). At the start of each episode the trainer reads those samples ahead
(``begin_step``'s ``read_ahead``: a second loader at the same position, which serves exactly the
batches the training loader will serve next) and this step, without gradient:

1. computes every sample's projected features z^I, z^T (128-d heads on the joint embeddings, L2-
   normalised) and, with an external teacher, its text features (mean-pooled, L2-normalised, PCA to
   ``external_pca`` dims);
2. runs K-means (FAISS; ``clusters`` centroids, 20 iterations, 3 redos, seeded by the episode)
   separately on the image, text (and external) features -> centroids C and labels l per sample;
3. keeps them fixed for the episode. Prototypes: with Prototypical Back Translation (PBT) the
   image student's prototype k is the mean of the image features of the samples whose *text* label
   is k (empty clusters stay zero; means are not re-normalised); without PBT it is the text
   centroid C^T_k. Symmetrically for the text student.

Per micro-batch (rows = this rank's samples; prototypes and targets are global):

    L_proto = 1/2 [ CE(t_p z^I P^I^T, q^T) + CE(t_p z^T P^T^T, q^I) ],  q^T_n = softmax(C^T[l^T_n] C^T^T / tau_t)
    L_ext   = 1/2 [ CE(t_p z^I P^{I<-E}^T, l^E) + CE(t_p z^T P^{T<-E}^T, l^E) ]     (hard labels)
    L       = L_objective (CLIP) + proto_weight * L_proto + external_weight * L_ext

t_p is a second learnable logit scale (init 1/0.07, clamped to <= 100); tau_t <= 0 gives hard
labels. The first ``warmup_episodes`` episodes train the objective only (no clustering).

The episode state (centroids, prototypes, labels, episode number) lives in buffers, so it is saved
in ``method.safetensors`` and a run resumed mid-episode trains on the same prototypes; the data
position comes from the loader's own exact resume.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from clipforge.config import MethodConfig, Recipe
from clipforge.methods import register_method
from clipforge.objectives.selfsup import mlp
from clipforge.objectives.base import Metrics
from clipforge.train.step import Outputs, TrainStep

EXTERNAL_NEEDS = frozenset({"text_embeds"})


class ProtoclipConfig(MethodConfig):
    name: str = "protoclip"
    episode_steps: int = Field(20, ge=1)  # optimiser steps per episode (paper: 200k samples)
    clusters: int = Field(256, ge=2)  # K per modality (paper: 20,000 for 200k samples, ~10 per cluster)
    kmeans_iters: int = Field(20, ge=1)
    kmeans_redo: int = Field(3, ge=1)
    head_hidden: int = Field(2048, ge=1)  # projection heads: Linear -> BN -> ReLU -> Linear, L2-normalised
    head_out: int = Field(128, ge=2)
    proto_scale_init: float = Field(1 / 0.07, gt=0.0)  # t_p
    proto_scale_max: float = Field(100.0, ge=1.0)
    target_temperature: float = 0.01  # tau_t of the soft targets; <= 0: hard labels
    back_translation: bool = True  # PBT; False: the student is classified against the other modality's centroids
    proto_weight: float = Field(1.0, ge=0.0)
    external_teacher: str | None = None  # a [[teachers]] entry whose text_embeds are the external structure
    external_weight: float = Field(1.0, ge=0.0)
    external_pca: int = Field(64, ge=2)  # the paper: RoBERTa-large 1024 -> 64
    warmup_episodes: int = Field(1, ge=0)  # objective only (InfoNCE warm-up)

    def check_recipe(self, recipe: Recipe) -> None:
        if self.external_teacher is not None and not any(t.name == self.external_teacher for t in recipe.teachers):
            raise ValueError(f"method.external_teacher = '{self.external_teacher}' names no [[teachers]] entry; add "
                             f"one with name = \"{self.external_teacher}\" (kind \"checkpoint\" or \"cache\")")
        if recipe.train.accum_mode == "gradcache":
            raise ValueError("method 'protoclip' adds per-sample prototype losses with BatchNorm heads; "
                             "train.accum_mode = 'gradcache' cannot replay them: use 'plain'")


# ----------------------------------------------------------------------------- episode maths
def kmeans(features: Tensor, k: int, iters: int, redo: int, seed: int) -> tuple[Tensor, Tensor]:
    """FAISS K-means on N x d float features -> (centroids K x d, labels N)."""
    from clipforge.index.dense import require_faiss

    faiss = require_faiss()
    x = features.detach().float().cpu().contiguous().numpy()
    if x.shape[0] < k:
        raise ValueError(f"an episode has {x.shape[0]} samples but method.clusters = {k}: raise "
                         "method.episode_steps (or the batch size) or lower method.clusters")
    km = faiss.Kmeans(x.shape[1], k, niter=iters, nredo=redo, seed=seed, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=x.shape[0])
    km.train(x)
    _, labels = km.index.search(x, 1)
    return torch.from_numpy(km.centroids.copy()), torch.from_numpy(labels[:, 0].astype("int64"))


def back_translate(features: Tensor, labels: Tensor, k: int) -> Tensor:
    """PBT: prototype j = mean of ``features`` (N x d) over the samples with ``labels == j``; empty -> 0."""
    sums = torch.zeros(k, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=k).to(features.dtype).clamp(min=1)
    return sums / counts[:, None]


def soft_targets(centroids: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """q_n = softmax(C[l_n] . C^T / tau) (N x K); tau <= 0: one-hot l_n."""
    if temperature <= 0:
        return F.one_hot(labels, centroids.shape[0]).to(centroids.dtype)
    return F.softmax(centroids[labels] @ centroids.T / temperature, dim=1)


def prototype_loss(features: Tensor, prototypes: Tensor, targets: Tensor, scale: Tensor) -> Tensor:
    """Soft-target cross-entropy of ``scale * features @ prototypes^T`` (N x K) against ``targets`` (N x K)."""
    logits = scale * features.float() @ prototypes.float().T
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def pca_reduce(x: Tensor, dims: int) -> Tensor:
    """Centre and project N x D onto its top ``dims`` principal directions (deterministic SVD)."""
    if x.shape[1] <= dims:
        return x
    centred = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:dims].T


# ----------------------------------------------------------------------------- the step
@register_method
class ProtoclipStep(TrainStep):
    name = "protoclip"
    Config = ProtoclipConfig
    supports_gradcache = False

    def __init__(self, recipe: Recipe, model: nn.Module, objective, teachers: dict[str, nn.Module]):
        super().__init__(recipe, model, objective, teachers)
        cfg: ProtoclipConfig = recipe.method
        self.cfg = cfg
        self.accum_steps = recipe.train.accum_steps
        self.batch_size = recipe.data.batch_size
        self.seed = recipe.train.seed
        dims = [recipe.model.embed_dim, cfg.head_hidden, cfg.head_out]
        self.image_head, self.text_head = mlp(dims), mlp(dims)
        self.proto_logit_scale = nn.Parameter(torch.tensor(math.log(cfg.proto_scale_init)))
        k, d = cfg.clusters, cfg.head_out
        # the episode state: checkpointed with the step, so a resumed run keeps the episode's prototypes
        self.register_buffer("episode", torch.tensor(-1))  # the episode these buffers belong to; -1: none
        for name in ("image_centroids", "text_centroids", "image_prototypes", "text_prototypes",
                     "image_from_external", "text_from_external"):
            self.register_buffer(name, torch.zeros(k, d))
        for name in ("image_labels", "text_labels", "external_labels"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.long))
        self.current_step = 0
        self.micro_batch = 0

    # ------------------------------------------------------------------ episodes
    def episode_of(self, step: int) -> int:
        return step // self.cfg.episode_steps

    def clustering_on(self, episode: int) -> bool:
        return episode >= self.cfg.warmup_episodes and (self.cfg.proto_weight > 0 or self.external_active)

    @property
    def external_active(self) -> bool:
        return self.cfg.external_teacher is not None and self.cfg.external_weight > 0

    def begin_step(self, step: int, read_ahead: Callable[[int], Iterator[dict[str, Any]]]) -> None:
        """Called by the trainer before every optimiser step; at an episode's first step (or when a
        resumed run has no state for the current episode) it clusters the episode's samples."""
        self.current_step, self.micro_batch = step, 0
        episode = self.episode_of(step)
        if int(self.episode) == episode or not self.clustering_on(episode):
            return
        if step % self.cfg.episode_steps:
            raise RuntimeError(f"step {step} is inside episode {episode} but the checkpoint holds no state for it "
                               f"(it has episode {int(self.episode)}); resume from a checkpoint of this run")
        self.build_episode(episode, read_ahead(self.cfg.episode_steps * self.accum_steps))

    @torch.no_grad()
    def episode_features(self, batches: Iterator[dict[str, Any]]) -> dict[str, Tensor]:
        """z^I, z^T (and external text features) of the episode's samples on this rank, in stream order."""
        was_training = self.training
        self.eval()  # no patch dropout, BN running statistics: one fixed view of each sample
        parts: dict[str, list[Tensor]] = {"image": [], "text": [], "external": []}
        try:
            for batch in batches:
                out = self.model(batch["images"], batch["input_ids"], batch["attention_mask"])
                parts["image"].append(F.normalize(self.image_head(out["image_embeds"]), dim=-1).float())
                parts["text"].append(F.normalize(self.text_head(out["text_embeds"]), dim=-1).float())
                if self.external_active:
                    teacher = self.teachers[self.cfg.external_teacher]
                    ext = teacher(batch, EXTERNAL_NEEDS)["text_embeds"]
                    parts["external"].append(F.normalize(ext.float(), dim=-1))
        finally:
            self.train(was_training)
        return {k: torch.cat(v) for k, v in parts.items() if v}

    @torch.no_grad()
    def build_episode(self, episode: int, batches: Iterator[dict[str, Any]]) -> None:
        from clipforge.objectives.distributed import active_world_size, gather_no_grad

        local = self.episode_features(batches)
        feats = {k: gather_no_grad(v) for k, v in local.items()}  # every rank's samples, in rank order
        k, cfg = self.cfg.clusters, self.cfg
        seed = (self.seed * 1_000_003 + episode) % 2**31
        device = self.image_labels.device
        if active_world_size() > 1:  # cluster once on rank 0, then every rank holds the same state
            import torch.distributed as dist

            clustered = self._cluster(feats, k, seed) if dist.get_rank() == 0 else None
            box = [clustered]
            dist.broadcast_object_list(box, src=0)
            clustered = box[0]
        else:
            clustered = self._cluster(feats, k, seed)
        for name, value in clustered.items():
            setattr(self, name, value.to(device))
        # PBT anchors live in the student's own space; the grouping comes from the other modality
        image, text = feats["image"].to(device), feats["text"].to(device)
        if cfg.back_translation:
            self.image_prototypes = back_translate(image, self.text_labels, k)
            self.text_prototypes = back_translate(text, self.image_labels, k)
        else:
            self.image_prototypes = self.text_centroids.clone()
            self.text_prototypes = self.image_centroids.clone()
        if "external_labels" in clustered:
            self.image_from_external = back_translate(image, self.external_labels, k)
            self.text_from_external = back_translate(text, self.external_labels, k)
        self.episode = torch.tensor(episode, device=device)

    def _cluster(self, feats: dict[str, Tensor], k: int, seed: int) -> dict[str, Tensor]:
        cfg = self.cfg
        warn_if_fewer_distinct_than_clusters(feats, k)
        out: dict[str, Tensor] = {}
        out["image_centroids"], out["image_labels"] = kmeans(feats["image"], k, cfg.kmeans_iters, cfg.kmeans_redo, seed)
        out["text_centroids"], out["text_labels"] = kmeans(feats["text"], k, cfg.kmeans_iters, cfg.kmeans_redo,
                                                           seed + 1)
        if "external" in feats:
            reduced = pca_reduce(feats["external"].cpu().double(), cfg.external_pca).float()
            _, out["external_labels"] = kmeans(F.normalize(reduced, dim=-1), k, cfg.kmeans_iters, cfg.kmeans_redo,
                                               seed + 2)
        return {name: value.contiguous() for name, value in out.items()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the label arrays hold one entry per episode sample: take the saved length
        for name in ("image_labels", "text_labels", "external_labels"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.zeros_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ the step
    def encode(self, batch: dict[str, Any]) -> Outputs:
        outputs = super().encode(batch)
        outputs["proto_image"] = F.normalize(self.image_head(outputs["image_embeds"]), dim=-1)
        outputs["proto_text"] = F.normalize(self.text_head(outputs["text_embeds"]), dim=-1)
        return outputs

    def batch_rows(self, n: int) -> Tensor:
        """Positions of this micro-batch's samples in the episode's global (rank-ordered) label arrays."""
        from clipforge.objectives.distributed import active_world_size

        rank, world = 0, active_world_size()
        if world > 1:
            import torch.distributed as dist

            rank = dist.get_rank()
        per_rank = self.image_labels.numel() // world
        offset = ((self.current_step % self.cfg.episode_steps) * self.accum_steps + self.micro_batch) * n
        return torch.arange(offset, offset + n, device=self.image_labels.device) + rank * per_rank

    def compute_loss(self, outputs: Outputs, batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        loss, metrics = self.objective(outputs, batch)
        episode = self.episode_of(self.current_step)
        if int(self.episode) != episode or not self.training:  # warm-up, eval, or a step outside the trainer
            self.micro_batch += 1
            # a zero that still reaches the heads and t_p: DDP expects every trainable parameter in the graph
            unused = outputs["proto_image"].sum() + outputs["proto_text"].sum() + self.proto_logit_scale
            return loss + 0.0 * unused, metrics
        rows = self.batch_rows(outputs["proto_image"].shape[0])
        self.micro_batch += 1
        scale = self.proto_logit_scale.exp()
        z_image, z_text = outputs["proto_image"], outputs["proto_text"]
        cfg = self.cfg
        if cfg.proto_weight > 0:
            q_text = soft_targets(self.text_centroids, self.text_labels[rows], cfg.target_temperature)
            q_image = soft_targets(self.image_centroids, self.image_labels[rows], cfg.target_temperature)
            proto = 0.5 * (prototype_loss(z_image, self.image_prototypes, q_text, scale)
                           + prototype_loss(z_text, self.text_prototypes, q_image, scale))
            loss = loss + cfg.proto_weight * proto
            metrics["proto/loss"] = proto.detach()
        if self.external_active:
            hard = F.one_hot(self.external_labels[rows], cfg.clusters).float()
            ext = 0.5 * (prototype_loss(z_image, self.image_from_external, hard, scale)
                         + prototype_loss(z_text, self.text_from_external, hard, scale))
            loss = loss + cfg.external_weight * ext
            metrics["external/loss"] = ext.detach()
        metrics["proto_scale"] = scale.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)
        self.proto_logit_scale.clamp_(0.0, math.log(self.cfg.proto_scale_max))


def warn_if_fewer_distinct_than_clusters(feats: dict[str, Tensor], k: int) -> None:
    """Captions made from class names (CIFAR's "a photo of a cat.") give few distinct text features. K-means
    then fills the other centroids with near-copies that no sample is assigned to: their PBT prototypes are
    zero while the soft targets spread over them, and the image student is pushed away from every class
    (the embeddings collapse; docs/methods/protoclip.md). Say so instead of training into it."""
    for name, x in feats.items():
        distinct = torch.unique(x.round(decimals=4), dim=0).shape[0]
        if distinct < k:
            warnings.warn(f"ProtoCLIP: the episode's {name} features have only {distinct} distinct values but "
                          f"method.clusters = {k}; most {name} clusters will be empty near-copies. Set "
                          f"method.clusters <= {distinct} (e.g. the number of distinct captions)", stacklevel=3)
