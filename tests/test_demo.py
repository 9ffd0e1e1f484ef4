"""The demo shows the MiB paper's finding. Its exact figures depend on the CPU's kernels (AVX2 and
AVX-512 builds of the same operations round differently), so the test checks the finding, not
the digits (README, "What the demo shows"). Slow: two demo runs of about two minutes each."""

from __future__ import annotations

import json

import pytest

from incseg.cli import main


def _steps(config: str, out) -> list[dict]:
    assert main(["run", config, "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "metrics.json").read_text())["steps"]


@pytest.mark.slow
def test_mib_keeps_the_old_classes_that_fine_tuning_forgets(tmp_path):
    mib, ft = _steps("demo", tmp_path / "mib"), _steps("demo-ft", tmp_path / "ft")
    assert mib[0]["miou_old"] == ft[0]["miou_old"] > 0.5  # the same step 0
    assert mib[-1]["miou_old"] >= 0.9 * mib[0]["miou_old"]
    assert ft[-1]["miou_old"] < 0.1 * ft[0]["miou_old"]
    assert (
        mib[-1]["miou_all"] > ft[-1]["miou_all"] and ft[-1]["miou_new"] > mib[-1]["miou_new"] > 0.2
    )
