"""TinyCLIP automatic weight inheritance (methods.md section 4), as a method: learn which parts of a
teacher-shaped model to keep with hard-concrete L0 gates under a Lagrangian sparsity target, while
distilling; then ``prune_checkpoint`` cuts the gated-off parts out, giving a smaller clipforge
checkpoint whose outputs equal the gated model's (deterministic gates).

    [method]
    name = "tinyclip_prune"
    granularity = "cofi"      # the default; or "groups": see below
    target_sparsity = 0.5     # share of the towers' block parameters to remove
    warmup_steps = 100        # target: start_sparsity -> target_sparsity, linearly
    [model]                   # the teacher's shape, warm-started from it
    init_from = "runs/big"

The gates, per tower (clipforge.models.l0), at one of two granularities:

- ``cofi`` (TinyCLIP / CoFi): ``<tower>_hidden`` one gate per residual dim (shared by every layer, as
  CoFi's hidden mask), ``<tower>_heads`` one per head of every layer, ``<tower>_units`` one per MLP unit
  of every layer, ``<tower>_mha`` / ``<tower>_ffn`` one per attention / MLP sublayer. The pruned model has
  per-layer head counts and MLP widths (ModelConfig.*_layer_heads / *_layer_mlp, the teacher's head_dim):
  a clipforge checkpoint that OpenCLIP and Hugging Face cannot hold (ONNX export works).
- ``groups`` (for students OpenCLIP and HF must take): ``<tower>_layers`` one gate per block (attention and MLP together) and ``<tower>_width``
  one gate per head index g, shared by every layer, gating head g, the g-th head_dim-sized group of
  hidden dims and the g-th group of MLP units. The pruned model keeps one shape per tower: an ordinary
  checkpoint that exports to OpenCLIP and Hugging Face.

Both are expressed as the same per-layer gates (``TowerGates``), which the hooks and the pruning read.
The gated model: every LayerNorm reading the residual stream normalises over the kept hidden dims
only (so removing the others changes nothing), the stream is multiplied by the hidden gates where
it starts and after every sublayer (with the sublayer's gate), head outputs and MLP units by theirs.
Gates are sampled in training and deterministic in eval (``HardConcreteGates``). The loss adds the
Lagrangian penalty on the expected sparsity; gates, lambdas and the step count are method state
(saved in method.safetensors, so a resume is exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from clipforge.config import MethodConfig, ModelConfig, ParamGroupConfig, Recipe
from clipforge.methods import register_method
from clipforge.models.inherit import TOWERS as WIDTH_KEYS  # (width, layers, heads) keys
from clipforge.models.l0 import HardConcreteGates, LagrangianPenalty, expected_tower_params, target_sparsity
from clipforge.objectives.base import Metrics
from clipforge.train.step import Outputs, TrainStep

TOWERS = {"visual": "vision", "text": "text"}  # module name -> ModelConfig prefix


class TinyclipPruneConfig(MethodConfig):
    name: str = "tinyclip_prune"
    # cofi: heads, MLP units and hidden dims gated apart, per layer, and attention / MLP sublayers apart
    # (TinyCLIP's automatic inheritance); groups: whole head groups across layers and whole blocks, which
    # prune to one shape per tower (an OpenCLIP / Hugging Face exportable model)
    granularity: Literal["cofi", "groups"] = "cofi"
    target_sparsity: float = Field(0.5, gt=0.0, lt=1.0)
    start_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    warmup_steps: int = Field(100, ge=0)
    init_keep: float = Field(0.95, gt=0.0, lt=1.0)  # log_alpha = logit(init_keep), CoFi's init (P(z > 0) ~ 0.99)
    # TinyCLIP trains the gates (lr 0.02) and the Lagrange multipliers (|lr| 0.02) in an optimiser of their
    # own at a constant lr, no weight decay: at a model's lr (~5e-4) the gates barely move in a few hundred
    # steps. An optim.groups entry matching "gates.*" or "lagrangian.*" overrides these
    gate_lr: float = Field(0.02, gt=0.0)
    lambda_lr: float = Field(0.02, gt=0.0)
    # how prune_checkpoint sizes the pruned model. "expected": CoFi's test-time gates (per gate set, the
    # expected number closed), whose realised sparsity can fall short of the target (in products of
    # gates, e.g. heads x hidden dims, the counts round apart); "target": from there, close the open
    # gates least likely open (lowest P(z > 0), over every set) until the realised sparsity reaches
    # target_sparsity, so students of one target have one size
    prune_size: Literal["expected", "target"] = "expected"

    def check_recipe(self, recipe: Recipe) -> None:
        if any(t.kind == "ema" for t in recipe.teachers):
            raise ValueError("method 'tinyclip_prune' gates the model with hooks; an ema teacher would copy them. "
                             "Use a checkpoint (or cache) teacher")
        m = recipe.model
        if m.image_tower != "vit":
            raise ValueError(f"method 'tinyclip_prune' gates the ViT's heads, MLP units and hidden dims; "
                             f"model.image_tower = '{m.image_tower}' has none: distil it into a ViT student instead")
        if m.text_tower != "clip" or m.lexical_head or m.text_projection != "linear":
            raise ValueError("method 'tinyclip_prune' prunes CLIP's own towers and linear projections: "
                             "model.text_tower = 'hf', text_projection = 'mlp' and lexical heads are not pruned")
        if self.granularity == "cofi":
            return
        if not m.uniform_layers():
            raise ValueError("method 'tinyclip_prune' with granularity = 'groups' gates head groups shared by every "
                             "layer; this model's layers differ (a CoFi-pruned model): set method.granularity = 'cofi'")
        for width, _, heads in WIDTH_KEYS.values():
            units = int(getattr(m, width) * m.mlp_ratio)
            if units % getattr(m, heads):
                raise ValueError(f"method 'tinyclip_prune' groups MLP units by head: int(model.{width} x "
                                 f"model.mlp_ratio) = {units} must be a multiple of model.{heads} "
                                 "(or set method.granularity = 'cofi')")


def masked_layer_norm(x: Tensor, ln: nn.LayerNorm, keep: Tensor) -> Tensor:
    """LayerNorm over the kept dims only (``keep``: 0/1 per dim); the others come out 0."""
    m = keep.to(x.dtype)
    n = m.sum().clamp_min(1)  # a sampled mask may close every group: the output is then 0, not 0 / 0
    mean = (x * m).sum(-1, keepdim=True) / n
    var = ((x - mean) * m).pow(2).sum(-1, keepdim=True) / n
    return ((x - mean) * torch.rsqrt(var + ln.eps) * ln.weight + ln.bias) * m


# ----------------------------------------------------------------------------- gates per layer
@dataclass
class TowerGates:
    """One tower's gate values as the hooks and the pruning read them, whatever the granularity.
    ``hidden``: W, one per residual dim. Per layer: ``heads`` (H_l, one per head; None without attention),
    ``units`` (M_l; None without an MLP), ``mha`` / ``ffn`` (the sublayer's own gate; 0 without it)."""

    hidden: Tensor
    heads: list[Tensor | None]
    units: list[Tensor | None]
    mha: list[Tensor]
    ffn: list[Tensor]

    def detached(self) -> "TowerGates":
        def d(t):
            return None if t is None else t.detach()
        return TowerGates(self.hidden.detach(), [d(t) for t in self.heads], [d(t) for t in self.units],
                          [d(t) for t in self.mha], [d(t) for t in self.ffn])


def gate_sizes(cfg: ModelConfig, granularity: str) -> dict[str, int]:
    """Name -> number of gates, for a model of ``cfg``."""
    sizes = {}
    for tower, prefix in TOWERS.items():
        shapes = cfg.block_shapes(prefix)
        if granularity == "groups":
            sizes[f"{tower}_width"] = getattr(cfg, f"{prefix}_heads")
            sizes[f"{tower}_layers"] = len(shapes)
        else:
            sizes[f"{tower}_hidden"] = getattr(cfg, f"{prefix}_width")
            sizes[f"{tower}_heads"] = sum(h for h, _ in shapes)
            sizes[f"{tower}_units"] = sum(u for _, u in shapes)
            sizes[f"{tower}_mha"] = sum(1 for h, _ in shapes if h)
            sizes[f"{tower}_ffn"] = sum(1 for _, u in shapes if u)
    return sizes


def _split(values: Tensor, counts: list[int]) -> list[Tensor | None]:
    """A flat vector -> one piece per layer (None where a layer has none)."""
    pieces = iter(values.split([c for c in counts if c]))
    return [next(pieces) if c else None for c in counts]


def tower_gates(cfg: ModelConfig, values: dict[str, Tensor], tower: str) -> TowerGates:
    """``values`` (gate name -> values, ``gate_sizes``'s names, either granularity) as per-layer gates."""
    prefix = TOWERS[tower]
    shapes = cfg.block_shapes(prefix)
    if f"{tower}_width" in values:  # groups: gate g = head g, hidden group g, MLP unit group g in every layer
        per_group = values[f"{tower}_width"]
        width, heads = getattr(cfg, f"{prefix}_width"), getattr(cfg, f"{prefix}_heads")
        units = shapes[0][1]
        layers = values[f"{tower}_layers"]
        return TowerGates(per_group.repeat_interleave(width // heads), [per_group] * len(shapes),
                          [per_group.repeat_interleave(units // heads)] * len(shapes), list(layers), list(layers))
    zero = values[f"{tower}_hidden"].new_zeros(())
    mha, ffn = iter(values[f"{tower}_mha"]), iter(values[f"{tower}_ffn"])
    return TowerGates(values[f"{tower}_hidden"], _split(values[f"{tower}_heads"], [h for h, _ in shapes]),
                      _split(values[f"{tower}_units"], [u for _, u in shapes]),
                      [next(mha) if h else zero for h, _ in shapes], [next(ffn) if u else zero for _, u in shapes])


@register_method
class TinyclipPruneStep(TrainStep):
    name = "tinyclip_prune"
    Config = TinyclipPruneConfig
    supports_gradcache = False  # gates are sampled once per forward

    def __init__(self, recipe: Recipe, model: nn.Module, objective, teachers: dict[str, nn.Module]):
        super().__init__(recipe, model, objective, teachers)
        self.cfg: TinyclipPruneConfig = recipe.method
        self.gates = nn.ModuleDict({name: HardConcreteGates(n, self.cfg.init_keep)
                                    for name, n in gate_sizes(model.cfg, self.cfg.granularity).items()})
        self.lagrangian = LagrangianPenalty()
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._sampled: dict[str, TowerGates] | None = None
        for tower in TOWERS:
            self._hook(tower)

    def default_param_groups(self) -> list[ParamGroupConfig]:
        """The gates' and multipliers' constant learning rates (clipforge.train.params.build_param_groups)."""
        return [ParamGroupConfig(match="gates.*", lr=self.cfg.gate_lr, weight_decay=0.0),
                ParamGroupConfig(match="lagrangian.*", lr=self.cfg.lambda_lr, weight_decay=0.0)]

    def state_mismatch_hint(self, missing: set[str], unexpected: set[str]) -> str:
        other = "groups" if self.cfg.granularity == "cofi" else "cofi"
        if any(k.startswith("gates.") for k in unexpected) and set(gate_sizes(self.model.cfg, other)) >= {
                k.split(".")[1] for k in unexpected if k.startswith("gates.")}:
            return (f"the checkpoint's gates are method.granularity = '{other}' (before 2026-11-28 the only one, and "
                    f"the default): resume with --set method.granularity={other}")
        return ""

    # ------------------------------------------------------------------ gates
    def gate_values(self) -> dict[str, Tensor]:
        """Deterministic gate values (CoFi's test-time gates), by gate name."""
        was = {k: g.training for k, g in self.gates.items()}
        for g in self.gates.values():
            g.eval()
        values = {k: g() for k, g in self.gates.items()}
        for k, g in self.gates.items():
            g.train(was[k])
        return values

    def tower_gates(self, values: dict[str, Tensor] | None = None) -> dict[str, TowerGates]:
        """Per-layer gates of both towers: of ``values``, else deterministic ones."""
        values = self.gate_values() if values is None else values
        return {tower: tower_gates(self.model.cfg, values, tower) for tower in TOWERS}

    def _current(self, tower: str) -> TowerGates:
        """This forward's gates: sampled in training (once per encode), deterministic otherwise."""
        if self.training and self._sampled is not None:
            return self._sampled[tower]
        return self.tower_gates()[tower]

    def _hook(self, tower: str) -> None:
        module = getattr(self.model, tower)
        head_dim = self.model.cfg.head_dim(TOWERS[tower])

        def norm(mod, args, out):  # LayerNorm over the kept hidden dims
            return masked_layer_norm(args[0], mod, self._current(tower).hidden != 0)

        def start(mod, args, out):  # ViT: after ln_pre
            hidden = self._current(tower).hidden
            return masked_layer_norm(args[0], mod, hidden != 0) * hidden

        def text_start(mod, args):  # text: the embeddings entering the first block
            return (args[0] * self._current(tower).hidden, *args[1:])

        def heads_in(index):  # attn.proj input: N x T x (H x head_dim), head h's dims by its gate
            return lambda mod, args: (args[0] * self._current(tower).heads[index].repeat_interleave(head_dim),)

        def units_in(index):
            return lambda mod, args: (args[0] * self._current(tower).units[index],)

        def branch_out(index, kind):  # what a sublayer adds to the stream: by its gate and the hidden gates
            def hook(mod, args, out):
                z = self._current(tower)
                gate = getattr(z, kind)[index] * z.hidden
                return (out[0] * gate, *out[1:]) if isinstance(out, tuple) else out * gate
            return hook

        if tower == "visual":
            module.ln_pre.register_forward_hook(start)
            module.ln_post.register_forward_hook(norm)
        else:
            module.blocks[0].register_forward_pre_hook(text_start)
            module.ln_final.register_forward_hook(norm)
        for i, block in enumerate(module.blocks):
            if block.attn is not None:
                block.ln_1.register_forward_hook(norm)
                block.attn.proj.register_forward_pre_hook(heads_in(i))
                block.attn.register_forward_hook(branch_out(i, "mha"))
            if block.mlp is not None:
                block.ln_2.register_forward_hook(norm)
                block.mlp.proj.register_forward_pre_hook(units_in(i))
                block.mlp.register_forward_hook(branch_out(i, "ffn"))

    # ------------------------------------------------------------------ sparsity
    def expected_sparsity(self) -> Tensor:
        """1 - E[block weights] / all block weights, both towers together (TinyCLIP's joint flag), with
        CoFi's count (l0.expected_tower_params): per layer a head holds 4 x head_dim x W weights and an MLP
        unit 2 x W, under the sublayer's gate, W the expected kept width (groups: head_dim x the open width
        gates, which makes a block (4 + 2r) E[W]^2)."""
        return sparsity_of(self.model.cfg, {k: g.prob_nonzero() for k, g in self.gates.items()})

    # ------------------------------------------------------------------ the step
    def encode(self, batch: dict[str, Any]) -> Outputs:
        if self.training:
            sampled = {k: g() for k, g in self.gates.items()}
            self._sampled = self.tower_gates(sampled)
        else:
            self._sampled = None
        return super().encode(batch)

    def compute_loss(self, outputs: Outputs, batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        loss, metrics = self.objective(outputs, batch)
        sparsity = self.expected_sparsity()
        target = target_sparsity(int(self.steps_done), self.cfg.target_sparsity, self.cfg.warmup_steps,
                                 self.cfg.start_sparsity)
        penalty = self.lagrangian(sparsity, target)
        metrics = {**metrics, "prune/expected_sparsity": sparsity.detach(), "prune/target": target,
                   "prune/penalty": penalty.detach(), "prune/lambda_1": self.lagrangian.lambda_1.detach(),
                   "prune/lambda_2": self.lagrangian.lambda_2.detach()}
        return loss + penalty, metrics

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)
        self.steps_done.fill_(step)


# ----------------------------------------------------------------------------- sparsity
def sparsity_of(cfg: ModelConfig, probs: dict[str, Tensor]) -> Tensor:
    """1 - (block weights kept) / (all block weights), both towers, for gate probabilities ``probs``
    (the expected sparsity) or 0/1 values (the realised sparsity of decided gates)."""
    def params(p: dict[str, Tensor], tower: str) -> Tensor:
        z = tower_gates(cfg, p, tower)  # probabilities in the place of gate values
        return expected_tower_params(z.mha, z.ffn, z.heads, z.units, z.hidden, cfg.head_dim(TOWERS[tower]))

    every = {k: torch.ones_like(v) for k, v in probs.items()}  # every gate open: the full count
    return 1 - sum(params(probs, t) for t in TOWERS) / sum(float(params(every, t)) for t in TOWERS)


def realised_sparsity(cfg: ModelConfig, values: dict[str, Tensor]) -> float:
    """The share of block weights that pruning with gate ``values`` removes."""
    return float(sparsity_of(cfg, {k: (v > 0).float() for k, v in values.items()}))


def close_to_target(cfg: ModelConfig, values: dict[str, Tensor], probs: dict[str, Tensor],
                    target: float) -> dict[str, Tensor]:
    """``values`` (CoFi's test-time gates) with more gates closed, least likely open first (lowest
    ``probs``, over every gate set), until the realised sparsity reaches ``target``; one gate of each set
    stays open. Gates CoFi's rule closed stay closed, open ones keep their values."""
    values = {k: v.detach().clone() for k, v in values.items()}
    if realised_sparsity(cfg, values) >= target:
        return values
    order = sorted((float(probs[k][i]), k, i) for k, v in values.items() for i in (v > 0).nonzero().flatten().tolist())
    for _, k, i in order:
        if int((values[k] > 0).sum()) <= 1:
            continue
        values[k][i] = 0.0
        if realised_sparsity(cfg, values) >= target:
            break
    return values


# ----------------------------------------------------------------------------- pruning
def _head_rows(heads: list[int], head_dim: int) -> Tensor:
    """The rows of an attention's q (or k, v) block that belong to ``heads``."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads]).long()


def _kept(z: Tensor | None, gate: Tensor) -> list[int]:
    return [] if z is None or float(gate) <= 0 else [i for i, v in enumerate(z.tolist()) if v > 0]


def _shape_fields(prefix: str, width: int, head_dim: int, layers: list[tuple[int, int]], mlp_ratio: float) -> dict:
    """A pruned tower's ModelConfig fields: the plain ones when every layer has the same full shape
    (heads x head_dim = width, width x mlp_ratio units), else per-layer counts."""
    heads = [h for h, _ in layers]
    fields = {f"{prefix}_width": width, f"{prefix}_layers": len(layers), f"{prefix}_heads": max(max(heads), 1)}
    if len(set(layers)) == 1 and heads[0] * head_dim == width and layers[0][1] == int(width * mlp_ratio):
        return {**fields, f"{prefix}_head_dim": None, f"{prefix}_layer_heads": None, f"{prefix}_layer_mlp": None}
    return {**fields, f"{prefix}_head_dim": head_dim, f"{prefix}_layer_heads": heads,
            f"{prefix}_layer_mlp": [u for _, u in layers]}


def pruned_model(model: nn.Module, gates: dict[str, TowerGates]) -> nn.Module:
    """The smaller CLIP that computes what ``model`` gated by ``gates`` (deterministic values) computes:
    closed dims, heads, units and sublayers are removed (a layer with neither sublayer left goes), open
    gates are folded into the weights they scale."""
    from clipforge.models.clip import CLIP

    cfg, sd = model.cfg, {k: v.detach() for k, v in model.state_dict().items()}
    new_fields, out = {}, {}
    for tower, prefix in TOWERS.items():
        z = gates[tower].detached()
        head_dim = cfg.head_dim(prefix)
        dims = (z.hidden > 0).nonzero().flatten()
        zd = z.hidden[dims]
        p = f"{tower}."
        layers = []  # (source index, kept heads, kept units)
        for i in range(len(cfg.block_shapes(prefix))):
            heads, units = _kept(z.heads[i], z.mha[i]), _kept(z.units[i], z.ffn[i])
            if heads or units:
                layers.append((i, heads, units))
        if not len(dims) or not layers:
            raise ValueError(f"every {tower} {'hidden dim' if not len(dims) else 'layer'} gate is closed: nothing "
                             "would be left of that tower; lower method.target_sparsity")
        new_fields.update(_shape_fields(prefix, len(dims), head_dim, [(len(h), len(u)) for _, h, u in layers],
                                        cfg.mlp_ratio))
        if tower == "visual":
            out[p + "patch_embed.weight"] = sd[p + "patch_embed.weight"][dims]
            if p + "class_token" in sd:
                out[p + "class_token"] = sd[p + "class_token"][dims]
            out[p + "pos_embed"] = sd[p + "pos_embed"][:, dims]
            out[p + "ln_pre.weight"] = sd[p + "ln_pre.weight"][dims] * zd
            out[p + "ln_pre.bias"] = sd[p + "ln_pre.bias"][dims] * zd
            final = "ln_post"
        else:
            out[p + "token_embed.weight"] = sd[p + "token_embed.weight"][:, dims] * zd
            out[p + "pos_embed"] = sd[p + "pos_embed"][:, dims] * zd
            final = "ln_final"
        for name in (f"{p}{final}.weight", f"{p}{final}.bias"):
            out[name] = sd[name][dims]
        for j, (i, heads, units) in enumerate(layers):
            s, d = f"{p}blocks.{i}.", f"{p}blocks.{j}."
            if heads:
                scale = z.mha[i] * zd  # on everything the attention adds to the stream
                rows = _head_rows(heads, head_dim)
                inner = sd[s + "attn.proj.weight"].shape[1]
                out[d + "ln_1.weight"], out[d + "ln_1.bias"] = sd[s + "ln_1.weight"][dims], sd[s + "ln_1.bias"][dims]
                qkv = sd[s + "attn.qkv.weight"].view(3, inner, -1)  # q, k, v rows of head h at h*head_dim..
                out[d + "attn.qkv.weight"] = qkv[:, rows][:, :, dims].reshape(-1, len(dims))
                out[d + "attn.qkv.bias"] = sd[s + "attn.qkv.bias"].view(3, inner)[:, rows].reshape(-1)
                z_rows = z.heads[i].repeat_interleave(head_dim)[rows]
                out[d + "attn.proj.weight"] = sd[s + "attn.proj.weight"][dims][:, rows] * z_rows[None, :] * scale[:, None]
                out[d + "attn.proj.bias"] = sd[s + "attn.proj.bias"][dims] * scale
            if units:
                scale, idx = z.ffn[i] * zd, torch.tensor(units)
                out[d + "ln_2.weight"], out[d + "ln_2.bias"] = sd[s + "ln_2.weight"][dims], sd[s + "ln_2.bias"][dims]
                out[d + "mlp.fc.weight"] = sd[s + "mlp.fc.weight"][idx][:, dims]
                out[d + "mlp.fc.bias"] = sd[s + "mlp.fc.bias"][idx]
                mlp_proj = sd[s + "mlp.proj.weight"][dims][:, idx]
                out[d + "mlp.proj.weight"] = mlp_proj * z.units[i][idx][None, :] * scale[:, None]
                out[d + "mlp.proj.bias"] = sd[s + "mlp.proj.bias"][dims] * scale
        projection = "image_projection.weight" if tower == "visual" else "text_projection.weight"
        out[projection] = sd[projection][:, dims]
    for key in ("logit_scale", "logit_bias"):
        if key in sd:
            out[key] = sd[key]
    small = CLIP(ModelConfig.model_validate({**cfg.model_dump(), **new_fields, "init_from": None}))
    small.load_state_dict({k: v.contiguous() for k, v in out.items()}, strict=True)
    return small


def prune_checkpoint(ckpt_dir: str | Path, out: str | Path, size: str | None = None) -> Path:
    """A ``tinyclip_prune`` training checkpoint -> an ordinary, smaller clipforge checkpoint at ``out``.
    ``size``: "expected" or "target" (TinyclipPruneConfig.prune_size); None: the run's own setting."""
    from safetensors.torch import load_file

    from clipforge.api import load
    from clipforge.models.convert import write_model_checkpoint
    from clipforge.train import checkpoint as ckpt

    ckpt_dir = Path(ckpt_dir)
    model, _, tokenizer = load(ckpt_dir)
    method_file = ckpt_dir / ckpt.METHOD_WEIGHTS
    if not method_file.is_file():
        raise FileNotFoundError(f"{ckpt_dir} has no {ckpt.METHOD_WEIGHTS}: is it a checkpoint of a "
                                "method.name = 'tinyclip_prune' run?")
    state = load_file(str(method_file))
    granularity = "cofi" if "gates.visual_hidden.log_alpha" in state else "groups"
    values, probs = {}, {}
    for name in gate_sizes(model.cfg, granularity):
        key = f"gates.{name}.log_alpha"
        if key not in state:
            raise ckpt.CheckpointError(f"{method_file} has no {key}: not a tinyclip_prune checkpoint of this model "
                                       "(method.name = 'tinyclip_prune' runs save their gates there)")
        g = HardConcreteGates(state[key].numel())
        g.log_alpha.data.copy_(state[key])
        values[name], probs[name] = g.eval()().detach(), g.prob_nonzero().detach()
    recipe = ckpt.read_config(ckpt_dir).get("recipe")
    method = TinyclipPruneConfig.model_validate((recipe or {}).get("method") or {"name": "tinyclip_prune"})
    size = size or method.prune_size
    if size not in ("expected", "target"):
        raise ValueError(f"prune size is 'expected' or 'target', got {size!r}")
    if size == "target":
        values = close_to_target(model.cfg, values, probs, method.target_sparsity)
    small = pruned_model(model, {tower: tower_gates(model.cfg, values, tower) for tower in TOWERS})
    source = {"from": "tinyclip_prune", "checkpoint": str(ckpt_dir), "prune_size": size,
              "realised_sparsity": round(realised_sparsity(model.cfg, values), 4)}
    config = ckpt.checkpoint_config(small.cfg, tokenizer, source=source)
    config["recipe"] = recipe  # the data the pruned model continues on (clipforge distill reads it)
    return write_model_checkpoint(out, small, tokenizer, config)
