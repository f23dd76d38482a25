"""Shipped prompt-template sets for zero-shot classification (our own phrasings).

A template is a ``str.format`` pattern with one ``{}`` for the class name. Pass a set by name
(``--templates shapes``) or a text file with one template per line.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE_SETS: dict[str, list[str]] = {
    # match the phrasings of the built-in shapes captions
    "shapes": [
        "a {}",
        "a photo of a {}",
        "a small {}",
        "a large {}",
        "a {} in the centre",
    ],
    "name": ["{}"],
    # general photos (ImageNet-style classes)
    "photo": [
        "a photo of a {}.",
        "a blurry photo of a {}.",
        "a close-up photo of a {}.",
        "a bright photo of a {}.",
        "a dark photo of the {}.",
        "a low resolution photo of a {}.",
        "a cropped photo of the {}.",
        "a good photo of a {}.",
        "a photo of one {}.",
        "a photo of many {}.",
        "a drawing of a {}.",
        "a painting of the {}.",
        "a sketch of a {}.",
        "a rendering of a {}.",
        "a pixelated photo of the {}.",
        "a jpeg of a {}.",
        "a toy {}.",
        "an origami {}.",
        "a {} in a video game.",
        "art of the {}.",
    ],
}


def resolve_templates(spec: str) -> list[str]:
    """A shipped set name or a file path -> list of templates (each must contain ``{}``)."""
    if spec in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"templates '{spec}': not a shipped set ({', '.join(TEMPLATE_SETS)}) and no such file"
        )
    templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"templates file {spec}: every line needs one '{{}}' for the class name; bad: {bad[:3]}")
    return templates
