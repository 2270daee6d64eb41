import numpy as np

from calibration.pipeline import _Photometry, _SignalFrames


def test_signal_frames_window_equals_the_full_stacks_signal_sliced():
    rng = np.random.default_rng(3)
    shape = (6, 9)
    phot = _Photometry(
        exposure=0.02,
        dark=rng.uniform(90, 110, shape),
        read_noise=rng.uniform(1, 2, shape),
        background=rng.uniform(0, 50, shape),
        gain=1.5,
        levels=np.linspace(0, 1, 5),
        response=np.linspace(0, 1, 5),
        gamma=2.2,
    )
    raw = rng.integers(0, 4096, (4, *shape), dtype=np.uint16)
    before = raw.copy()
    full = (raw.astype(np.float64) - phot.dark) / phot.exposure - phot.background
    window = (slice(None), slice(1, 5), slice(2, 8))
    np.testing.assert_array_equal(_SignalFrames(raw, phot)[window], full[window])
    assert len(_SignalFrames(raw, phot)) == 4
    np.testing.assert_array_equal(raw, before)  # the raw stack is left as the camera gave it
