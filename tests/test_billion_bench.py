"""benchmarks/billion.py reads its children's numbers (synthetic child outputs, no model)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # billion.py imports its sibling _children
spec = importlib.util.spec_from_file_location("bench_billion", REPO / "benchmarks" / "billion.py")
billion = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = billion
spec.loader.exec_module(billion)
from _children import PREFIX, WatchedRun  # noqa: E402


def _run(stdout: str = "") -> WatchedRun:
    return WatchedRun(returncode=0, exceeded=False, wall_s=1.0, sampled_peak_rss_mb=0.0, tree_peak_rss_mb=0.0,
                      min_available_mb=0.0, max_load1=0.0, stdout=stdout, stderr="")


def test_inference_and_fit_rows_carry_whole_run_load_and_steady_peaks(tmp_path):
    # the inference child of device_memory.py prints its phases, not a single peak
    child = {"peaks_mb": {"load": 3000.0, "first_step": 3900.0, "steady": 3800.0}, "whole_run_peak_mb": 3900.0,
             "steps": 3, "s_per_step": 5.0}
    inf = billion._child_numbers(billion.ROWS["inference"], _run(PREFIX + json.dumps(child)), tmp_path)
    assert (inf["peak_rss_mb"], inf["load_peak_rss_mb"], inf["steady_peak_rss_mb"]) == (3900.0, 3000.0, 3800.0)
    (tmp_path / "summary.json").write_text(json.dumps({
        "steps": 3, "wall_s": 30.0, "device_peak_rss_mb": 4200.0, "device_load_peak_rss_mb": 3100.0,
        "device_steady_peak_rss_mb": 4180.0}))
    mob = billion._child_numbers(billion.ROWS["mobillm"], _run(), tmp_path)
    assert (mob["peak_rss_mb"], mob["steady_peak_rss_mb"], mob["s_per_step"]) == (4200.0, 4180.0, 10.0)
    rows = {"inference": inf, "mobillm": mob, "full_ft": {"peak_rss_mb": 18000.0, "exceeded": True}}
    r = billion.ratios(rows)
    assert r["steady_vs_inference_steady"] == {"inference": 1.0, "mobillm": 1.1}
    assert r["whole_run_vs_inference_steady"]["mobillm"] == round(4200 / 3800, 3)
    assert "full_ft" not in r["whole_run_vs_inference_steady"]  # a killed row's peak is a lower bound
    assert r["vs_inference"]["mobillm"] == round(4200 / 3900, 3)
