"""TinyCLIP automatic weight inheritance (methods.md section 4), as a method: learn which parts of a
teacher-shaped model to keep with hard-concrete L0 gates under a Lagrangian sparsity target, while
distilling; then ``prune_checkpoint`` cuts the gated-off parts out, giving an ordinary smaller
clipforge checkpoint whose outputs equal the gated model's (deterministic gates).

    [method]
    name = "tinyclip_prune"
    target_sparsity = 0.5     # share of the towers' block parameters to remove
    warmup_steps = 100        # target: start_sparsity -> target_sparsity, linearly
    [model]                   # the teacher's shape, warm-started from it
    init_from = "runs/big"

The gates, per tower (clipforge.models.l0):

- ``<tower>_layers``: one gate per block (attention and MLP together); a closed gate removes the block.
- ``<tower>_width``: one gate per head index g, shared by every layer. It gates head g, the g-th
  head_dim-sized group of hidden (residual) dims and the g-th group of MLP units. TinyCLIP/CoFi gate
  heads, MLP units and hidden dims separately and per layer; a clipforge tower has one width, one
  head count and one MLP ratio, with heads x head_dim = width, so only whole-head groups prune to an
  ordinary checkpoint (docs/methods/tinyclip.md says more).

The gated model: every LayerNorm reading the residual stream normalises over the kept hidden dims
only (so removing the others changes nothing), the stream is multiplied by the hidden gates where
it starts and after every sublayer (with the block gate), head outputs and MLP units by theirs.
Gates are sampled in training and deterministic in eval (``HardConcreteGates``). The loss adds the
Lagrangian penalty on the expected sparsity; gates, lambdas and the step count are method state
(saved in method.safetensors, so a resume is exact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from clipforge.config import MethodConfig, ModelConfig, ParamGroupConfig, Recipe
from clipforge.methods import register_method
from clipforge.models.l0 import HardConcreteGates, LagrangianPenalty, target_sparsity
from clipforge.objectives.base import Metrics
from clipforge.train.step import Outputs, TrainStep

TOWERS = {"visual": ("vision_width", "vision_layers", "vision_heads"),
          "text": ("text_width", "text_layers", "text_heads")}


class TinyclipPruneConfig(MethodConfig):
    name: str = "tinyclip_prune"
    target_sparsity: float = Field(0.5, gt=0.0, lt=1.0)
    start_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    warmup_steps: int = Field(100, ge=0)
    init_keep: float = Field(0.95, gt=0.0, lt=1.0)  # initial P(gate open)
    # TinyCLIP trains the gates (lr 0.02) and the Lagrange multipliers (|lr| 0.02) in an optimiser of their
    # own at a constant lr, no weight decay: at a model's lr (~5e-4) the gates barely move in a few hundred
    # steps. An optim.groups entry matching "gates.*" or "lagrangian.*" overrides these
    gate_lr: float = Field(0.02, gt=0.0)
    lambda_lr: float = Field(0.02, gt=0.0)

    def check_recipe(self, recipe: Recipe) -> None:
        if any(t.kind == "ema" for t in recipe.teachers):
            raise ValueError("method 'tinyclip_prune' gates the model with hooks; an ema teacher would copy them. "
                             "Use a checkpoint (or cache) teacher")
        m = recipe.model
        for width, _, heads in TOWERS.values():
            units = int(getattr(m, width) * m.mlp_ratio)
            if units % getattr(m, heads):
                raise ValueError(f"method 'tinyclip_prune' groups MLP units by head: int(model.{width} x "
                                 f"model.mlp_ratio) = {units} must be a multiple of model.{heads}")


def masked_layer_norm(x: Tensor, ln: nn.LayerNorm, keep: Tensor) -> Tensor:
    """LayerNorm over the kept dims only (``keep``: 0/1 per dim); the others come out 0."""
    m = keep.to(x.dtype)
    n = m.sum().clamp_min(1)  # a sampled mask may close every group: the output is then 0, not 0 / 0
    mean = (x * m).sum(-1, keepdim=True) / n
    var = ((x - mean) * m).pow(2).sum(-1, keepdim=True) / n
    return ((x - mean) * torch.rsqrt(var + ln.eps) * ln.weight + ln.bias) * m


def tower_shape(cfg: ModelConfig, tower: str) -> tuple[int, int, int, int]:
    """(width, layers, heads, MLP units) of a tower."""
    width, layers, heads = (getattr(cfg, k) for k in TOWERS[tower])
    return width, layers, heads, int(width * cfg.mlp_ratio)


@register_method
class TinyclipPruneStep(TrainStep):
    name = "tinyclip_prune"
    Config = TinyclipPruneConfig
    supports_gradcache = False  # gates are sampled once per forward

    def __init__(self, recipe: Recipe, model: nn.Module, objective, teachers: dict[str, nn.Module]):
        super().__init__(recipe, model, objective, teachers)
        self.cfg: TinyclipPruneConfig = recipe.method
        self.gates = nn.ModuleDict()
        for tower in TOWERS:
            _, layers, heads, _ = tower_shape(model.cfg, tower)
            self.gates[f"{tower}_width"] = HardConcreteGates(heads, self.cfg.init_keep)
            self.gates[f"{tower}_layers"] = HardConcreteGates(layers, self.cfg.init_keep)
        self.lagrangian = LagrangianPenalty()
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._sampled: dict[str, Tensor] | None = None
        for tower in TOWERS:
            self._hook(tower)

    def default_param_groups(self) -> list[ParamGroupConfig]:
        """The gates' and multipliers' constant learning rates (clipforge.train.params.build_param_groups)."""
        return [ParamGroupConfig(match="gates.*", lr=self.cfg.gate_lr, weight_decay=0.0),
                ParamGroupConfig(match="lagrangian.*", lr=self.cfg.lambda_lr, weight_decay=0.0)]

    # ------------------------------------------------------------------ gates
    def gate_values(self) -> dict[str, Tensor]:
        """This forward's gates: sampled in training (once per encode), deterministic in eval."""
        if self.training and self._sampled is not None:
            return self._sampled
        was = {k: g.training for k, g in self.gates.items()}
        for g in self.gates.values():
            g.eval()
        values = {k: g() for k, g in self.gates.items()}
        for k, g in self.gates.items():
            g.train(was[k])
        return values

    def _expanded(self, tower: str) -> tuple[Tensor, Tensor, Tensor]:
        """(hidden gates per dim, MLP gates per unit, layer gates) of a tower."""
        z = self.gate_values()
        width, _, heads, units = tower_shape(self.model.cfg, tower)
        per_head = z[f"{tower}_width"]
        return (per_head.repeat_interleave(width // heads), per_head.repeat_interleave(units // heads),
                z[f"{tower}_layers"])

    def _hook(self, tower: str) -> None:
        module = getattr(self.model, tower)

        def norm(mod, args, out):  # LayerNorm over the kept hidden dims
            return masked_layer_norm(args[0], mod, self._expanded(tower)[0] != 0)

        def start(mod, args, out):  # ViT: after ln_pre
            hidden = self._expanded(tower)[0]
            return masked_layer_norm(args[0], mod, hidden != 0) * hidden

        def text_start(mod, args):  # text: the embeddings entering the first block
            return (args[0] * self._expanded(tower)[0], *args[1:])

        def heads_in(mod, args):  # attn.proj input: N x T x (H x head_dim), head g's dims by gate g
            return (args[0] * self._expanded(tower)[0],)

        def units_in(mod, args):
            return (args[0] * self._expanded(tower)[1],)

        def branch_out(index):
            def hook(mod, args, out):
                hidden, _, layers = self._expanded(tower)
                gate = layers[index] * hidden
                return (out[0] * gate, *out[1:]) if isinstance(out, tuple) else out * gate
            return hook

        if tower == "visual":
            module.ln_pre.register_forward_hook(start)
            module.ln_post.register_forward_hook(norm)
        else:
            module.blocks[0].register_forward_pre_hook(text_start)
            module.ln_final.register_forward_hook(norm)
        for i, block in enumerate(module.blocks):
            block.ln_1.register_forward_hook(norm)
            block.ln_2.register_forward_hook(norm)
            block.attn.proj.register_forward_pre_hook(heads_in)
            block.mlp.proj.register_forward_pre_hook(units_in)
            block.attn.register_forward_hook(branch_out(i))
            block.mlp.register_forward_hook(branch_out(i))

    # ------------------------------------------------------------------ sparsity
    def expected_sparsity(self) -> Tensor:
        """1 - E[block parameters] / all block parameters, both towers together (TinyCLIP's joint
        flag). A block holds (4 + 2 r) W^2 weights; E[W] = head_dim x sum P(width gate open)."""
        expected, full = 0.0, 0.0
        for tower in TOWERS:
            width, layers, heads, units = tower_shape(self.model.cfg, tower)
            per_block = 4 + 2 * units / width
            e_width = (width // heads) * self.gates[f"{tower}_width"].prob_nonzero().sum()
            e_layers = self.gates[f"{tower}_layers"].prob_nonzero().sum()
            expected = expected + e_layers * per_block * e_width**2
            full += layers * per_block * width**2
        return 1 - expected / full

    # ------------------------------------------------------------------ the step
    def encode(self, batch: dict[str, Any]) -> Outputs:
        self._sampled = {k: g() for k, g in self.gates.items()} if self.training else None
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


# ----------------------------------------------------------------------------- pruning
def pruned_model(model: nn.Module, gates: dict[str, Tensor]) -> nn.Module:
    """The smaller CLIP that computes what ``model`` gated by ``gates`` (deterministic values) computes:
    closed groups and blocks are removed, open gates are folded into the weights they scale."""
    from clipforge.models.clip import CLIP

    cfg, sd = model.cfg, {k: v.detach() for k, v in model.state_dict().items()}
    new_sizes, out = {}, {}
    for tower in TOWERS:
        width, _, heads, units = tower_shape(cfg, tower)
        hd, upg = width // heads, units // heads
        kept_groups = [g for g in range(heads) if gates[f"{tower}_width"][g] > 0]
        kept_layers = [i for i, z in enumerate(gates[f"{tower}_layers"].tolist()) if z > 0]
        if not kept_groups or not kept_layers:
            raise ValueError(f"every {tower} {'width' if not kept_groups else 'layer'} gate is closed: "
                             "nothing would be left of that tower; lower method.target_sparsity")
        dims = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in kept_groups])
        unit_idx = torch.cat([torch.arange(g * upg, (g + 1) * upg) for g in kept_groups])
        z_dims = gates[f"{tower}_width"].repeat_interleave(hd)[dims]
        z_units = gates[f"{tower}_width"].repeat_interleave(upg)[unit_idx]
        width_key, layers_key, heads_key = TOWERS[tower]
        new_sizes.update({width_key: len(dims), layers_key: len(kept_layers), heads_key: len(kept_groups)})
        p = f"{tower}."
        if tower == "visual":
            out[p + "patch_embed.weight"] = sd[p + "patch_embed.weight"][dims]
            if p + "class_token" in sd:
                out[p + "class_token"] = sd[p + "class_token"][dims]
            out[p + "pos_embed"] = sd[p + "pos_embed"][:, dims]
            out[p + "ln_pre.weight"] = sd[p + "ln_pre.weight"][dims] * z_dims
            out[p + "ln_pre.bias"] = sd[p + "ln_pre.bias"][dims] * z_dims
            final = "ln_post"
        else:
            out[p + "token_embed.weight"] = sd[p + "token_embed.weight"][:, dims] * z_dims
            out[p + "pos_embed"] = sd[p + "pos_embed"][:, dims] * z_dims
            final = "ln_final"
        for name in (f"{p}{final}.weight", f"{p}{final}.bias"):
            out[name] = sd[name][dims]
        for j, i in enumerate(kept_layers):
            s, d = f"{p}blocks.{i}.", f"{p}blocks.{j}."
            scale = gates[f"{tower}_layers"][i] * z_dims  # on everything a sublayer adds to the stream
            for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
                out[d + name] = sd[s + name][dims]
            qkv = sd[s + "attn.qkv.weight"].view(3, width, width)  # rows: q, k, v of head g at g*hd.., as the dims
            out[d + "attn.qkv.weight"] = qkv[:, dims][:, :, dims].reshape(-1, len(dims))
            out[d + "attn.qkv.bias"] = sd[s + "attn.qkv.bias"].view(3, width)[:, dims].reshape(-1)
            out[d + "attn.proj.weight"] = sd[s + "attn.proj.weight"][dims][:, dims] * z_dims[None, :] * scale[:, None]
            out[d + "attn.proj.bias"] = sd[s + "attn.proj.bias"][dims] * scale
            out[d + "mlp.fc.weight"] = sd[s + "mlp.fc.weight"][unit_idx][:, dims]
            out[d + "mlp.fc.bias"] = sd[s + "mlp.fc.bias"][unit_idx]
            mlp_proj = sd[s + "mlp.proj.weight"][dims][:, unit_idx]
            out[d + "mlp.proj.weight"] = mlp_proj * z_units[None, :] * scale[:, None]
            out[d + "mlp.proj.bias"] = sd[s + "mlp.proj.bias"][dims] * scale
        projection = "image_projection.weight" if tower == "visual" else "text_projection.weight"
        out[projection] = sd[projection][:, dims]
    for key in ("logit_scale", "logit_bias"):
        if key in sd:
            out[key] = sd[key]
    small = CLIP(ModelConfig.model_validate({**cfg.model_dump(), **new_sizes, "init_from": None}))
    small.load_state_dict({k: v.contiguous() for k, v in out.items()}, strict=True)
    return small


def prune_checkpoint(ckpt_dir: str | Path, out: str | Path) -> Path:
    """A ``tinyclip_prune`` training checkpoint -> an ordinary, smaller clipforge checkpoint at ``out``."""
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
    gates = {}
    for name in [f"{t}_{k}" for t in TOWERS for k in ("width", "layers")]:
        key = f"gates.{name}.log_alpha"
        if key not in state:
            raise ValueError(f"{method_file} has no {key}: not a tinyclip_prune checkpoint")
        g = HardConcreteGates(state[key].numel())
        g.log_alpha.data.copy_(state[key])
        gates[name] = g.eval()().detach()
    small = pruned_model(model, gates)
    recipe = ckpt.read_config(ckpt_dir).get("recipe")
    source = {"from": "tinyclip_prune", "checkpoint": str(ckpt_dir)}
    config = ckpt.checkpoint_config(small.cfg, tokenizer, source=source)
    config["recipe"] = recipe  # the data the pruned model continues on (clipforge distill reads it)
    return write_model_checkpoint(out, small, tokenizer, config)
