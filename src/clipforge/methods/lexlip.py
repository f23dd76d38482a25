"""LexLIP phase 2: momentum lexicon-contrastive learning (Luo et al. ICCV 2023; methods.md section 9a).

The model's lexical heads (``model.lexical_head``) give non-negative vocabulary weights; the
recipe's objective (e.g. ``clip`` + ``lexical`` + ``flops``) runs as usual, and this step adds
MoCo's loss on the lexical vectors:

    q = normalise(l of the online model), k = normalise(l of the EMA teacher), no gradient
    i -> t: CE(q_img . [k_txt of the global batch, text queue] / tau, own pair)
    t -> i: the same with the roles swapped;   L_moco = (i->t + t->i) / 2

Two FIFO queues (``queue_size`` image keys and as many text keys, LexLIP: 4000 each) hold the
EMA keys of earlier batches. The keys of every micro-batch are gathered across ranks (no
gradient) and enqueued once per optimiser step, identically on every rank; an unfilled queue
contributes only its filled rows. Queues, pointer and fill count are buffers: saved with the
method state, so a resumed run sees the same negatives.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from clipforge.config import MethodConfig, Recipe
from clipforge.methods import register_method
from clipforge.objectives.base import Metrics
from clipforge.train.step import Outputs, TrainStep


class LexlipConfig(MethodConfig):
    name: str = "lexlip"
    teacher: str = "ema"  # the EMA teacher whose lexical weights are the keys
    queue_size: int = Field(4000, ge=0)  # keys per modality (LexLIP: 4000); 0 = in-batch EMA keys only
    temperature: float = Field(0.05, gt=0.0)  # LexLIP: 0.05
    moco_weight: float = Field(1.0, ge=0.0)

    def check_recipe(self, recipe: Recipe) -> None:
        if not recipe.model.lexical_head:
            raise ValueError("method 'lexlip' trains the lexical heads: set model.lexical_head = true")
        teacher = next((t for t in recipe.teachers if t.name == self.teacher), None)
        if teacher is None or teacher.kind != "ema":
            raise ValueError(f"method 'lexlip' takes its keys from an EMA teacher named '{self.teacher}': add "
                             f"[[teachers]] name = \"{self.teacher}\" kind = \"ema\" momentum = 0.99 to the recipe")
        if recipe.train.accum_mode == "gradcache":
            raise ValueError("method 'lexlip' enqueues keys per micro-batch; train.accum_mode = 'gradcache' "
                             "cannot replay that: use 'plain'")


def enqueue_(queue: Tensor, pointer: Tensor, count: Tensor, keys: Tensor) -> None:
    """Write ``keys`` (n x V) into the FIFO ``queue`` (K x V) at ``pointer``, wrapping around; in place."""
    size = queue.shape[0]
    keys = keys[-size:]  # more keys than slots: only the newest fit
    slots = (int(pointer) + torch.arange(keys.shape[0], device=queue.device)) % size
    queue[slots] = keys.to(queue.dtype)
    pointer.fill_((int(pointer) + keys.shape[0]) % size)
    count.fill_(min(size, int(count) + keys.shape[0]))


def momentum_contrastive(queries: Tensor, keys: Tensor, queue: Tensor, temperature: float, offset: int) -> Tensor:
    """CE of local queries (n x V, normalised) against [gathered keys; queue] (no grad); the positive of
    query i is key ``offset + i``."""
    columns = torch.cat([keys, queue]).detach()
    logits = queries @ columns.T / temperature
    labels = torch.arange(queries.shape[0], device=queries.device) + offset
    return F.cross_entropy(logits, labels)


@register_method
class LexlipStep(TrainStep):
    name = "lexlip"
    Config = LexlipConfig
    supports_gradcache = False

    def __init__(self, recipe: Recipe, model: nn.Module, objective, teachers: dict[str, nn.Module]):
        super().__init__(recipe, model, objective, teachers)
        cfg: LexlipConfig = recipe.method
        self.cfg = cfg
        vocab = recipe.model.vocab_size
        self.needs = self.needs | {"image_lexical", "text_lexical",
                                   f"{cfg.teacher}/image_lexical", f"{cfg.teacher}/text_lexical"}
        self.register_buffer("image_queue", torch.zeros(cfg.queue_size, vocab))
        self.register_buffer("text_queue", torch.zeros(cfg.queue_size, vocab))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))
        self._pending: list[tuple[Tensor, Tensor]] = []  # this step's gathered keys, enqueued after it

    def compute_loss(self, outputs: Outputs, batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        from clipforge.objectives.distributed import active_world_size, gather_no_grad

        loss, metrics = self.objective(outputs, batch)
        t = self.cfg.teacher
        image_q = F.normalize(outputs["image_lexical"].float(), dim=-1)
        text_q = F.normalize(outputs["text_lexical"].float(), dim=-1)
        with torch.no_grad():
            image_k = gather_no_grad(F.normalize(outputs[f"{t}/image_lexical"].float(), dim=-1))
            text_k = gather_no_grad(F.normalize(outputs[f"{t}/text_lexical"].float(), dim=-1))
        offset = 0
        if active_world_size() > 1:
            import torch.distributed as dist

            offset = dist.get_rank() * image_q.shape[0]
        filled = int(self.queue_count)
        i2t = momentum_contrastive(image_q, text_k, self.text_queue[:filled], self.cfg.temperature, offset)
        t2i = momentum_contrastive(text_q, image_k, self.image_queue[:filled], self.cfg.temperature, offset)
        moco = (i2t + t2i) / 2
        if self.training and torch.is_grad_enabled():
            self._pending.append((image_k, text_k))
        total = loss + self.cfg.moco_weight * moco
        metrics.update({"moco/loss": moco.detach(), "moco/queue": filled, "loss": total.detach()})
        return total, metrics

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)  # clamps t, moves the EMA teacher, term state
        if self.cfg.queue_size:
            for image_k, text_k in self._pending:  # both queues advance together: one pointer, one count
                enqueue_(self.text_queue, self.queue_pointer.clone(), self.queue_count.clone(), text_k)
                enqueue_(self.image_queue, self.queue_pointer, self.queue_count, image_k)
        self._pending.clear()
