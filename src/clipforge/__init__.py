"""clipforge: pre-train, distill, evaluate and serve CLIP-family language-image models."""

__version__ = "0.1.0"

from clipforge.api import load  # noqa: E402
from clipforge.config import Recipe, load_recipe  # noqa: E402

__all__ = ["load", "load_recipe", "Recipe", "__version__"]
