"""``analyze: true`` in a study: each chosen run's adapter analysed into analysis.json, and a report that
``--report-only`` rebuilds from those files alone (a fresh clone has them, not the adapters)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from melora.analysis import analyze_adapter
from melora.lab.study.mechanism import blocks_for_lora
from melora.lab.study.spec import load_study
from tests.test_study import study


@pytest.mark.slow
def test_an_analyzing_study_reports_the_updates_and_report_only_needs_no_adapter(tmp_path):
    from tests.tiny_models import write_tiny_glue

    tiny = write_tiny_glue(tmp_path / "tiny", hidden=32, layers=2, counts=(("train", 32), ("dev", 16)))
    base = {"model": tiny["model"], "data_dir": tiny["data_dir"], "batch_size": 8, "eval_batch_size": 8,
            "max_length": 32, "save_model": True}  # fmt: skip
    data = study(tmp_path, base=base, tasks={"rte": {"epochs": 1}}, seeds=[0], lr_grid={},
                 methods=[{"method": "lora", "r": 8, "lr": {"rte": [1e-2]}},
                          {"method": "melora", "r": 1, "n": 8, "lr": [1e-2]}],
                 analyze=True)  # fmt: skip
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "melora.cli", "study", str(path), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "study"
    spec = load_study(path)
    assert blocks_for_lora(spec) == 8
    for slug, method in (("lora-r8", "lora"), ("melora-r1-n8", "melora")):
        run = root / "rte" / slug / "lr0.01" / "seed0"
        stored = json.loads((run / "analysis.json").read_text())
        fresh = analyze_adapter(run / "adapter", blocks_for_lora=8)
        assert stored["method"] == method and stored["summary"] == fresh["summary"]
        assert stored["adapter"] == "adapter"  # no machine's path in a committed file
    summary = json.loads((root / "summary.json").read_text())
    rows = {row["slug"]: row for row in summary["mechanism"]}
    assert rows["melora-r1-n8"]["nominal_rank"] == 8 and rows["lora-r8"]["nominal_rank"] == 8
    assert rows["lora-r8"]["mean_diagonal_energy_fraction"] is not None
    assert rows["melora-r1-n8"]["mean_effective_block_count"] <= 8
    report = (root / "report.md").read_text()
    assert "## The trained updates" in report and (root / "figures" / "spectra_rte.png").is_file()
    for adapter in root.glob("rte/*/*/*/adapter"):  # what a fresh clone has: results.json and analysis.json
        shutil.rmtree(adapter)
    done = subprocess.run([*command, "--report-only"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((root / "summary.json").read_text())["mechanism"] == summary["mechanism"]
    section = report[report.index("## The trained updates") :]
    again = (root / "report.md").read_text()
    assert again[again.index("## The trained updates") :] == section
