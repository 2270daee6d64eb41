"""The estimate's defaults, in a module without torch, so `hil --help` starts without loading it."""

DEFAULT_TRAIN_SIZE = 1200  # all of digits' 1078; a class-balanced subset of larger sets
DEFAULT_SEEDS = 3
