"""bench/memory_scaling.py --quick runs end to end and prints the JSON the docs are built from.

Only the shape of the output is checked: memory numbers depend on the machine (peaks just have
to be positive). The quick run starts fourteen small subprocesses: about 50 s on 2 quiet cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "memory_scaling.py"
PATHS = ("plain", "plain_checkpointed", "gradcache", "sigmoid_gradcache", "gradcache_chunked", "sigmoid_gradcache_chunked")
RESULT_KEYS = {
    "batch", "micro_batch", "accum_steps", "recipe_overrides", "peak_rss_mib", "step_increment_mib",
    "rss_after_build_mib", "build_peak_rss_mib", "peak_reset_after_build", "step_seconds", "params",
    "threads", "wall_s",
}


@pytest.mark.slow  # fourteen subprocesses that build and train a model
def test_memory_scaling_quick_prints_one_json_object():
    proc = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)  # one JSON object, nothing else on stdout

    assert out["bench"] == "memory_scaling"
    assert out["quick"] is True
    assert out["batches"] == [32, 64]
    assert out["micro_batch"] == 16
    assert out["model"]["embed_dim"] > 0
    assert set(out["analytic"]) == {"32", "64"}
    assert out["analytic"]["64"]["logits_nxn_bytes"] == 64 * 64 * 4

    assert set(out["paths"]) == set(PATHS)
    for name in PATHS:
        entry = out["paths"][name]
        assert entry["skipped"] == [], (name, entry["skipped"])
        assert [r["batch"] for r in entry["results"]] == [32, 64]
        for r in entry["results"]:
            assert RESULT_KEYS <= set(r), (name, RESULT_KEYS - set(r))
            assert r["peak_rss_mib"] > 0 and r["rss_after_build_mib"] > 0
            assert r["micro_batch"] * r["accum_steps"] == r["batch"]
            assert len(r["step_seconds"]) == out["steps_per_config"]
    # GradCache runs batch / micro micro-batches; plain runs the whole batch at once
    assert [r["accum_steps"] for r in out["paths"]["gradcache"]["results"]] == [2, 4]
    assert [r["accum_steps"] for r in out["paths"]["plain"]["results"]] == [1, 1]
    assert all("train.grad_checkpointing=true" in r["recipe_overrides"] for r in out["paths"]["plain_checkpointed"]["results"])

    chunked = out["sigmoid_chunked"]
    assert chunked["note"]
    for name in ("gradcache_chunked", "sigmoid_gradcache_chunked"):  # the recipe's own option, no N x N logits
        assert all("objective.terms.0.chunk_size=1024" in r["recipe_overrides"] for r in out["paths"][name]["results"])
    assert [m["batch"] for m in chunked["loss_only"]] == [32, 64]
    for m in chunked["loss_only"]:
        assert {"full", "chunked", "num_chunks"} <= set(m)
