"""Read the `clipforge eval` result files an experiment script wrote as RUNS/<arm>-s<seed>_<what>.json."""

from __future__ import annotations

import json
import re
from pathlib import Path


def read_eval_results(runs: Path, arms: tuple[str, ...], what: str = r".+") -> dict[tuple[str, int, str], dict]:
    """{(arm, seed, what): metrics} for the files of the given arms (``what``: a regex for the part after the seed)."""
    found = {}
    for path in runs.glob("*.json"):
        m = re.fullmatch(rf"(.+)-s(\d+)_({what})\.json", path.name)
        if m and m[1] in arms:
            found[(m[1], int(m[2]), m[3])] = json.loads(path.read_text())["metrics"]
    return found
