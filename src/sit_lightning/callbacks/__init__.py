"""Lightning callbacks: EMA of the weights, sample grids, FID during training, throughput / MFU."""

from .ema import PAPER_EMA_DECAY, EMACallback
from .fid import FIDCallback
from .preemption import PREEMPTED_EXIT_STATUS, PreemptionCallback
from .sample_grid import SampleGridCallback
from .throughput import ThroughputCallback

__all__ = [
    "EMACallback",
    "FIDCallback",
    "PAPER_EMA_DECAY",
    "PREEMPTED_EXIT_STATUS",
    "PreemptionCallback",
    "SampleGridCallback",
    "ThroughputCallback",
]
