"""The ``data.train`` string: one source or a weighted mixture, parsed without touching any file.

    shapes                                         the built-in dataset
    wds:/data/cc3m/{00000..00331}.tar              WebDataset shards (brace patterns, '::' joins patterns,
    wds:pipe:aws s3 cp s3://b/{0..9}.tar -          local paths or pipe: commands)
    jsonl:pairs.jsonl | csv:pairs.csv              image path + caption tables
    imagefolder:DIR                                one folder per class, caption from a template
    0.7*wds:/a/{0..9}.tar + 0.3*jsonl:pairs.jsonl  a mixture: sources joined by ' + ', optional WEIGHT* prefix

Kept free of heavy imports: the recipe validator calls it, so a typo fails before any work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SOURCE_KINDS = ("shapes", "wds", "jsonl", "csv", "imagefolder")
MIXTURE_SEPARATOR = " + "
_WEIGHT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*(.*)$", re.S)


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    target: str  # path, pattern or command; "" for shapes
    weight: float = 1.0
    weight_given: bool = False

    def __str__(self) -> str:
        return self.kind if self.kind == "shapes" else f"{self.kind}:{self.target}"


def parse_train_spec(text: str) -> list[SourceSpec]:
    """``"0.7*wds:a/{0..3}.tar + 0.3*jsonl:p.jsonl"`` -> two SourceSpecs; errors say how to write it."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("data.train is empty; write 'shapes' or a source such as 'wds:/data/{00000..00099}.tar'")
    return [_parse_one(part.strip(), text) for part in text.split(MIXTURE_SEPARATOR)]


def _parse_one(part: str, whole: str) -> SourceSpec:
    weight, given = 1.0, False
    m = _WEIGHT.match(part)
    if m:
        weight, given, part = float(m.group(1)), True, m.group(2).strip()
        if weight <= 0:
            raise ValueError(f"data.train: mixture weight must be > 0 in '{whole}'")
    if part == "shapes":
        return SourceSpec("shapes", "", weight, given)
    kind, sep, target = part.partition(":")
    valid = ", ".join(f"{k}:" for k in SOURCE_KINDS if k != "shapes")
    if not sep or not target.strip():
        raise ValueError(
            f"data.train source '{part}' has no kind prefix; write 'shapes' or KIND:PATH with KIND one of {valid} "
            f"(mixtures: '0.7*wds:/a/{{0..9}}.tar + 0.3*jsonl:pairs.jsonl')"
        )
    if kind not in SOURCE_KINDS:
        raise ValueError(f"data.train: unknown source kind '{kind}:' in '{part}'; valid: shapes, {valid}")
    return SourceSpec(kind, target.strip(), weight, given)
