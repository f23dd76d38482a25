"""clipforge: pre-train, distill, evaluate and serve CLIP-family language-image models."""

__version__ = "0.1.0"

from clipforge.api import evaluate, load, zero_shot_classifier  # noqa: E402
from clipforge.config import Recipe, load_recipe  # noqa: E402

__all__ = ["load", "evaluate", "zero_shot_classifier", "load_recipe", "Recipe", "__version__"]
