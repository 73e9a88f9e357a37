"""benchmarks/gpu.sh, dry-run on the CPU: every step of the GPU script runs and writes its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_dry_run_writes_every_experiment(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable, "MELORA_GPU_OUT": str(out), "OMP_NUM_THREADS": "1"}
    env["MELORA_GPU_TESTS"] = "0"  # tests/test_device.py runs in this suite already
    completed = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run"],
        capture_output=True, text=True, env=env, timeout=1200, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    log = (out / "gpu.log").read_text()
    assert "CPU dry run" in log and "== device tests" not in log
    for name in ("gpu_layer", "gpu_e2e", "gpu_compile", "gpu_kernels"):
        results = json.loads((out / f"{name}-quick.json").read_text())
        assert results["hardware"]["device"] == "cpu" and results["config"]["dtype"] == "float32"
        assert (out / f"{name}-quick.md").stat().st_size > 0 and (
            out / f"bench_{name}-quick.png"
        ).stat().st_size > 0
        labels = {row["label"] for case in results["cases"] for row in case["rows"]}
        if name == "gpu_layer":  # Llama-2-7B's non-square MLP shape, shrunk, and the n sweep at r = 1
            assert results["cases"][0]["case"] == "layer 256x512 T=128"
            assert {"melora r=1 n=2", "melora r=1 n=32", "melora r=2 n=32", "lora r=64"} <= labels
        if name == "gpu_e2e":
            assert results["cases"][0]["params"]["model"] == "smollm2-random"
        if name == "gpu_compile":
            assert {"melora r=1 n=8 +compile", "lora r=8 +compile", "base +compile"} <= labels
            assert any(t["check"].startswith("compiled_") for t in results["targets"])
