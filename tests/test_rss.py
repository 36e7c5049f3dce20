"""Per-phase peak memory (``lightning_mobillm.rss``): a phase's peak is its own, the whole run keeps all."""

import pytest
import torch

from lightning_mobillm.rss import PeakPhases, peak_rss_mb

pytestmark = pytest.mark.timeout(60)


def _touch(mb: int) -> None:
    block = torch.ones(mb * 2**20 // 4)  # written, so resident
    assert float(block[-1]) == 1.0
    del block


def test_a_later_phase_does_not_inherit_an_earlier_peak():
    phases = PeakPhases()
    if not phases.separated:
        pytest.skip("no /proc/self/status here: phases cannot be told apart")
    phases.mark("before")
    _touch(300)  # a transient 300 MB, freed before the mark
    peak = phases.mark("spike")
    calm = phases.mark("calm")
    assert phases.separated, "resetting the high-water mark failed (/proc/self/clear_refs not writable)"
    assert peak - calm > 250, phases.peaks_mb
    # the whole run still counts the spike, after the reset that hid it from ru_maxrss's live value
    assert phases.whole_run_mb >= peak and peak_rss_mb() >= peak


def test_without_proc_every_phase_reports_the_whole_run_peak(monkeypatch, tmp_path):
    import lightning_mobillm.rss as rss

    monkeypatch.setattr(rss, "_STATUS", tmp_path / "missing")
    phases = rss.PeakPhases()
    assert not phases.separated
    assert phases.mark("load") == pytest.approx(peak_rss_mb())


def test_a_child_does_not_inherit_its_parents_peak(tmp_path):
    """ru_maxrss survives exec (a child of a big parent reports the parent's size); peak_rss_mb must not."""
    import subprocess
    import sys

    block = torch.ones(400 * 2**20 // 4)  # this process holds 400 MB more while it starts the child
    code = "from lightning_mobillm.rss import peak_rss_mb; print(peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    del block
    if not PeakPhases().separated:
        pytest.skip("no /proc/self/status here")
    assert float(out.stdout) < 200, out.stdout  # an interpreter and this small module, not 400 MB
