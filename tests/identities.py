"""A capture-store identity for tests that write stores by hand."""

from hil.acquire.identity import StoreIdentity


def identity(**changes) -> StoreIdentity:
    base = dict(
        dataset="digits",
        split="test",
        fraction=1.0,
        seed=0,
        data_digest="0" * 32,
        indices_digest="0" * 32,
        input_shape=(32, 32),
        display_scale=1,
        display_origin=(0, 0),
        display_shape=(32, 32),
        calibration_id="test",
        bench_fingerprint="test",
        simulated=True,
    )
    return StoreIdentity(**(base | changes))
