"""LexLIP (Luo et al. ICCV 2023; methods.md section 9a): both phases of its pre-training, as methods.

Phase 1, ``lexlip_bottleneck``: lexicon-bottlenecked masked language modelling (LexMLM), added to the
recipe's objective (e.g. ``clip`` + ``lexical`` + ``flops``: the in-batch contrastive on the sparse l and
the FLOPs regulariser of the paper's phase 1). Each tower's lexical head gives logits over the text
vocabulary; their max over tokens, through a softmax, weights the text token embeddings E (no gradient
into E: the paper's "gradient cut") into one continuous bag-of-words vector per sample,

    b = softmax(max_tokens logits) . sg(E)          (image: from the image; text: from a masked caption)

and a weak (2-layer, bidirectional) decoder must rebuild a heavily masked copy of the caption from b
in the place of its first token. One decoder serves both bottlenecks; its vocabulary projection is the
text lexical head's. Losses (summed, as the released code): i2t (decoder from the image's b), t2t
(from the masked caption's b), and the text encoder's own MLM on the masked caption (self_t). BERT's
masking: a share of the real tokens (encoder 30 %, decoder 50 %; never the start / end tokens or
padding) is selected; of those 80 % become a learned [MASK] embedding, 10 % a random token, 10 % stay.

Phase 2, ``lexlip``: momentum lexicon-contrastive learning. The recipe's objective runs as usual and
this step adds MoCo's loss on the lexical vectors:

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
from clipforge.models.lexical import max_pooled_logits
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

    def discard_step(self) -> None:
        super().discard_step()
        self._pending.clear()  # a skipped step's keys never enter the queues


# ----------------------------------------------------------------------------- phase 1: LexMLM
class LexlipBottleneckConfig(MethodConfig):
    name: str = "lexlip_bottleneck"
    mlm_weight: float = Field(1.0, ge=0.0)  # i2t + t2t: the decoders' reconstruction from each bottleneck
    self_mlm_weight: float = Field(1.0, ge=0.0)  # the text encoder's own MLM on the masked caption
    encoder_mask: float = Field(0.3, gt=0.0, lt=1.0)  # LexLIP: 0.3
    decoder_mask: float = Field(0.5, gt=0.0, lt=1.0)  # LexLIP: 0.5
    decoder_layers: int = Field(2, ge=1)  # "weak": LexMAE / LexLIP use 2
    decoder_dropout: float = Field(0.1, ge=0.0, lt=1.0)  # BERT's layers

    def check_recipe(self, recipe: Recipe) -> None:
        m = recipe.model
        if not m.lexical_head or m.text_tower != "clip":
            raise ValueError("method 'lexlip_bottleneck' trains the lexical heads through a text decoder: set "
                             "model.lexical_head = true (with the native text tower), as the lexlip-shapes recipe")
        if recipe.train.accum_mode == "gradcache":
            raise ValueError("method 'lexlip_bottleneck' masks captions per micro-batch; train.accum_mode = "
                             "'gradcache' cannot replay that: use 'plain'")
        if recipe.data.captions_per_sample != 1 or recipe.data.sub_captions:
            raise ValueError("method 'lexlip_bottleneck' rebuilds each image's one caption from the image: set "
                             "data.captions_per_sample = 1 and data.sub_captions = 0")


def bert_mask(ids: Tensor, attention_mask: Tensor, prob: float, vocab_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """BERT's masking of N×L captions: each real token but the first (start) and the last (end-of-text) is
    selected with ``prob``; of the selected, 80 % -> [MASK], 10 % -> a random token, 10 % unchanged.
    Returns (ids with the random replacements, N×L bool: [MASK] here, labels: the original id where
    selected, -100 elsewhere)."""
    n, length = ids.shape
    positions = torch.arange(length, device=ids.device)
    last = attention_mask.long().sum(1, keepdim=True) - 1
    candidate = attention_mask.bool() & (positions > 0) & (positions < last)
    selected = candidate & (torch.rand(n, length, device=ids.device) < prob)
    kind = torch.rand(n, length, device=ids.device)
    to_mask = selected & (kind < 0.8)
    to_random = selected & (kind >= 0.8) & (kind < 0.9)
    random_ids = torch.randint(0, vocab_size, (n, length), device=ids.device)
    return torch.where(to_random, random_ids, ids), to_mask, torch.where(selected, ids, -100)


def bottleneck(pooled_logits: Tensor, word_embeddings: Tensor) -> Tensor:
    """N×V max-pooled lexical logits -> N×W: softmax over the vocabulary times the (detached) embeddings."""
    return pooled_logits.float().softmax(dim=-1) @ word_embeddings.detach().float()


class WeakDecoder(nn.Module):
    """A shallow bidirectional (post-norm, BERT-style) transformer that predicts a masked caption's words
    from the bottleneck b in the place of its first token. Its vocabulary projection is passed in (the
    text lexical head's, tied as LexMAE ties the decoder head to the encoder's)."""

    def __init__(self, width: int, heads: int, layers: int, dropout: float):
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=dropout, activation="gelu",
                                           batch_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))

    def forward(self, embeddings: Tensor, b: Tensor, attention_mask: Tensor, vocab: nn.Linear) -> Tensor:
        """N×L×W caption embeddings (masked), N×W bottleneck, N×L mask -> N×L×V logits."""
        x = torch.cat([b[:, None].to(embeddings.dtype), embeddings[:, 1:]], dim=1)
        x = self.layers(x, src_key_padding_mask=~attention_mask.bool())
        return vocab(self.transform(x))


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean CE over the selected positions (labels != -100); 0 when none was selected."""
    if not bool((labels != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


@register_method
class LexlipBottleneckStep(TrainStep):
    name = "lexlip_bottleneck"
    Config = LexlipBottleneckConfig
    supports_gradcache = False

    def __init__(self, recipe: Recipe, model: nn.Module, objective, teachers: dict[str, nn.Module]):
        super().__init__(recipe, model, objective, teachers)
        self.cfg: LexlipBottleneckConfig = recipe.method
        m = recipe.model
        self.needs = self.needs | {"image_lexical_logits"}
        self.mask_embedding = nn.Parameter(torch.randn(m.text_width) * 0.02)  # [MASK]: not a vocabulary word
        self.decoder = WeakDecoder(m.text_width, m.text_heads, self.cfg.decoder_layers, self.cfg.decoder_dropout)

    def _embed(self, ids: Tensor, to_mask: Tensor) -> Tensor:
        """Token embeddings of the text tower with [MASK] where asked."""
        tokens = self.model.text.token_embed(ids)
        return torch.where(to_mask[..., None], self.mask_embedding.to(tokens.dtype), tokens)

    def encode(self, batch: dict[str, Any]) -> Outputs:
        outputs = super().encode(batch)
        if not self.training:
            return outputs
        ids, mask = batch["input_ids"], batch["attention_mask"]
        vocab = self.model.cfg.vocab_size
        enc_ids, enc_mask, outputs["lexmlm/encoder_labels"] = bert_mask(ids, mask, self.cfg.encoder_mask, vocab)
        dec_ids, dec_mask, outputs["lexmlm/decoder_labels"] = bert_mask(ids, mask, self.cfg.decoder_mask, vocab)
        # the text tower on the masked caption: its own MLM, and the text bottleneck
        text = self.model.text(enc_ids, mask, return_tokens=True, token_embeds=self._embed(enc_ids, enc_mask))
        token_logits = self.model.text_lexical(text["tokens"])
        outputs["lexmlm/self_logits"] = token_logits
        embeddings = self.model.text.token_embed.weight
        b_text = bottleneck(max_pooled_logits(token_logits, mask), embeddings)
        b_image = bottleneck(outputs["image_lexical_logits"], embeddings)
        dec_input = self._embed(dec_ids, dec_mask) + self.model.text.pos_embed[: ids.shape[1]]
        head = self.model.text_lexical.decoder
        outputs["lexmlm/t2t_logits"] = self.decoder(dec_input, b_text, mask, head)
        outputs["lexmlm/i2t_logits"] = self.decoder(dec_input, b_image, mask, head)
        return outputs

    def compute_loss(self, outputs: Outputs, batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        loss, metrics = self.objective(outputs, batch)
        if "lexmlm/i2t_logits" not in outputs:  # evaluation: the objective alone
            return loss, metrics
        dec_labels = outputs["lexmlm/decoder_labels"]
        i2t = mlm_loss(outputs["lexmlm/i2t_logits"], dec_labels)
        t2t = mlm_loss(outputs["lexmlm/t2t_logits"], dec_labels)
        own = mlm_loss(outputs["lexmlm/self_logits"], outputs["lexmlm/encoder_labels"])
        total = loss + self.cfg.mlm_weight * (i2t + t2t) + self.cfg.self_mlm_weight * own
        metrics = {**metrics, "lexmlm/i2t": i2t.detach(), "lexmlm/t2t": t2t.detach(), "lexmlm/self": own.detach(),
                   "loss": total.detach()}
        return total, metrics
