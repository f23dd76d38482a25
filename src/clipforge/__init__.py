from clipforge.config import Recipe, load_recipe

__version__ = "0.1.0"
