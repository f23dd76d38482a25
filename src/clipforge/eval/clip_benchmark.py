"""Evaluate a clipforge checkpoint with CLIP_benchmark itself (``pip install 'clipforge[clip-benchmark]'``).

CLIP_benchmark loads a model by ``--model_type`` (``open_clip``, ``ja_clip``); this module adds the
type ``clipforge`` and runs CLIP_benchmark's own command line, every option as it documents them::

    python -m clipforge.eval.clip_benchmark eval --pretrained runs/x \\
        --dataset cifar10 --dataset_root data/cifar10 --output 'results/{dataset}_{pretrained}.json'

``--pretrained`` is the checkpoint (or a run directory: its checkpoints/latest); ``--model_type``
defaults to ``clipforge`` and ``--model`` to ``clipforge`` here (the name written in the results).
``{pretrained}`` in ``--output`` becomes the checkpoint path with ``/`` turned into ``_`` (CLIP_benchmark
would put the slashes in the file name). In Python::

    from clipforge.eval.clip_benchmark import register
    register()
    model, transform, tokenizer = clip_benchmark.models.load_clip("clipforge", "clipforge", "runs/x", None, "cpu")

CLIP_benchmark hands the model images from ``transform`` and text as the tokenizer's one tensor of
token ids; ``ClipBenchmarkModel`` and ``ClipBenchmarkTokenizer`` adapt clipforge's model (uint8
images, normalised inside) and tokenizer (ids + attention mask) to that.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

MODEL_TYPE = "clipforge"
INSTALL_HINT = "pip install 'clipforge[clip-benchmark]'"


class ClipBenchmarkModel(torch.nn.Module):
    """``encode_image(images)`` and ``encode_text(input_ids)``, as CLIP_benchmark calls them."""

    def __init__(self, model: torch.nn.Module, eot_id: int) -> None:
        super().__init__()
        self.model = model
        self.eot_id = eot_id

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        # CLIP_benchmark passes the ids alone; the text tower pools at the last real token, so the mask is
        # rebuilt from the first end-of-text token (every tokenized text has one, truncated or not). Padding
        # ids cannot tell it: OpenCLIP's tokenizer pads with id 0, a real token.
        first_eot = (input_ids == self.eot_id).int().argmax(dim=1)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        mask = (positions[None, :] <= first_eot[:, None]).long()
        return self.model.encode_text(input_ids, mask)


class ClipBenchmarkTokenizer:
    """texts -> one LongTensor of token ids (N x context length)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts) -> torch.Tensor:
        ids, _ = self.tokenizer([texts] if isinstance(texts, str) else list(texts))
        return ids


def load_clipforge(model_name: str = MODEL_TYPE, pretrained: str = "", cache_dir: str | None = None,
                   device: str | torch.device = "cpu"):
    """CLIP_benchmark's loader signature -> (model, transform, tokenizer); ``pretrained`` is the checkpoint."""
    from clipforge.api import load
    from clipforge.eval.evaluate import checkpoint_dir

    if not pretrained or not Path(pretrained).exists():
        raise FileNotFoundError(f"--pretrained {pretrained!r}: no such checkpoint or run directory (with "
                                f"--model_type {MODEL_TYPE}, --pretrained is the clipforge checkpoint)")
    model, preprocess, tokenizer = load(checkpoint_dir(pretrained), device=device)
    return ClipBenchmarkModel(model, tokenizer.eot_id).eval(), preprocess, ClipBenchmarkTokenizer(tokenizer)


def register() -> None:
    """Make ``clipforge`` a model type of the installed CLIP_benchmark (idempotent)."""
    import clip_benchmark.models as models

    models.TYPE2FUNC[MODEL_TYPE] = load_clipforge
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # the very list the CLI's --model_type choices are checked against
    _fix_accuracy_for_numpy_2_4()


def topk_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """CLIP_benchmark's ``accuracy``: the fraction of rows whose target is among the top k logits, per k."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def _fix_accuracy_for_numpy_2_4() -> None:
    """CLIP_benchmark 1.6.2's ``accuracy`` calls float() on a 1-element array, which NumPy 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"), so its zero-shot classification and
    linear probe fail after all the embedding. Where that happens, the same computation replaces it."""
    import importlib

    for name in ("clip_benchmark.metrics.zeroshot_classification", "clip_benchmark.metrics.linear_probe"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # linear_probe needs scikit-learn; nothing to fix where it cannot load
            continue
        accuracy = getattr(module, "accuracy", None)
        if accuracy is None or accuracy is topk_accuracy:
            continue
        try:
            accuracy(torch.tensor([[0.0, 1.0]]), torch.tensor([1]), topk=(1,))
        except TypeError:
            module.accuracy = topk_accuracy


def main(argv: list[str] | None = None) -> int:
    """CLIP_benchmark's command line with the ``clipforge`` model type (the default for ``eval`` here)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        register()
        import clip_benchmark.cli as cli
    except ImportError as e:
        print(f"error: CLIP_benchmark is not installed or incomplete ({e}); {INSTALL_HINT}", file=sys.stderr)
        return 2
    if argv[:1] == ["eval"]:
        given = {a.split("=", 1)[0] for a in argv}
        if "--model_type" not in given:
            argv += ["--model_type", MODEL_TYPE]
        if "--model" not in given and "--pretrained_model" not in given:
            argv += ["--model", MODEL_TYPE]
        cli.run = _file_safe_output(cli.run)
    old, sys.argv = sys.argv, ["clip_benchmark", *argv]
    try:
        return cli.main() or 0
    finally:
        sys.argv = old


def _file_safe_output(run):
    """CLIP_benchmark's ``run(args)``, with ``{pretrained}`` in ``--output`` filled by a file-name-safe
    form of a clipforge checkpoint path (CLIP_benchmark would keep its slashes: folders that do not exist),
    and the output's folder made."""
    if getattr(run, "clipforge_wrapped", False):
        return run

    def wrapped(args):
        if args.model_type == MODEL_TYPE:
            from clipforge.eval.evaluate import model_slug

            args.output = args.output.replace("{pretrained}", model_slug(args.pretrained))
            folder = Path(args.output).parent
            if "{" not in str(folder):  # CLIP_benchmark writes the file at the end, into an existing folder only
                folder.mkdir(parents=True, exist_ok=True)
        return run(args)

    wrapped.clipforge_wrapped = True
    return wrapped


if __name__ == "__main__":
    sys.exit(main())
