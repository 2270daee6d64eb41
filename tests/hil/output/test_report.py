"""The demo's report: confusion counts, the recovered fraction, and a summary a person can read."""

import math

import numpy as np
import pytest

from hil.jobs.demo import recovered
from hil.output.report import save_confusions, write_summary


def test_recovered_fraction_is_the_share_of_the_lost_accuracy():
    assert recovered(0.96, 0.80, 0.92) == pytest.approx(0.75)
    assert recovered(0.96, 0.80, 0.96) == 1.0
    assert math.isnan(recovered(0.90, 0.95, 0.96))  # nothing was lost


def test_summary_lists_every_variant_and_picture(tmp_path):
    matrix = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1]])
    pictures = save_confusions({"NTKD fine-tune": matrix}, tmp_path)
    picture = pictures["confusion matrix, NTKD fine-tune"]
    assert picture == tmp_path / "confusion_ntkd_finetune.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = {
        "out_dir": str(tmp_path),
        "accuracy": {"ONN in simulation (as designed)": 0.96, "no compensation": 0.8},
        "recovered_fraction": {"NTKD fine-tune": 0.75},
        "plan": {"dataset": "mnist5k", "teacher": "lenet"},
        "captured": {"train": 108, "val": 359, "test": 360},
        "fabrication": {"gain": 0.9},
        "calibration": {"psf_rel_error": 0.05},
        "pictures": {"confusion": str(picture)},
        "timings_s": {"calibrate": 12.0},
    }
    write_summary(tmp_path / "REPORT.md", result)
    text = (tmp_path / "REPORT.md").read_text()
    assert "| no compensation | 80.0% |" in text and text.startswith("# hil demo: mnist5k")
    assert "cost 16.0 points; NTKD fine-tune recovered 75.0% (teacher: lenet)." in text
    assert "](confusion_ntkd_finetune.png)" in text and "| calibrate | 12.0 |" in text
