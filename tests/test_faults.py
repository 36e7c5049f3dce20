"""Faults: a server or a device killed mid-run, and the run still ends with what an uninterrupted run trains.

Faults are placed only through the named fault points of :mod:`lightning_mobillm.faults` (``MOBILLM_FAULTS``),
never by timing: no sleep, no wall-time race; every child process has a timeout and the suite a per-test
limit. The runs are real processes (``tests/support/fault_run.py``: the device, and its embedded server
started by the device or a standalone ``serve``); the uninterrupted reference runs here, over the in-process
link. One torch thread, dropout 0 and the seeded data order make the two bit-identical, so "every sample
entered the final optimizer history exactly once" is checked as: the final side network EQUALS the
reference's (``torch.equal`` on every tensor), the server's step count is the planned one, and the device's
loop trained on the reference's batches in the reference's order.
"""

from __future__ import annotations

import pytest

from lightning_mobillm import faults


# ---- the hook itself ---------------------------------------------------------------------------------------
def test_fault_points_fire_only_where_and_when_named(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.fault_point("device:after_hello")  # unset: nothing
    monkeypatch.setenv(faults.ENV, "device:during_validation@2=ready, server:after_train_step@5=raise")
    for _ in range(3):
        faults.fault_point("device:during_validation", batch_idx=0)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"{faults.MARKER} device:during_validation action=ready")
    faults.fault_point("server:after_train_step", step=4)  # @N is the step when the point reports one
    with pytest.raises(faults.FaultInjected, match="server:after_train_step@5"):
        faults.fault_point("server:after_train_step", step=5)
    # with a fault folder, an entry fires once over every process that shares it (a restarted server)
    monkeypatch.setenv(faults.ENV_DIR, str(tmp_path))
    with pytest.raises(faults.FaultInjected):
        faults.fault_point("server:after_train_step", step=5)
    faults.fault_point("server:after_train_step", step=5)
    assert (tmp_path / "server-after_train_step@5.fired").exists()
    for bad in ("after_hello=sigint", "device:after_hello=explode", "device:after_hello@x=kill", "device:x"):
        with pytest.raises(ValueError, match="MOBILLM_FAULTS"):
            faults.parse_faults(bad)
