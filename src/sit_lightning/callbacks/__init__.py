"""Lightning callbacks: EMA of the weights, sample grids and FID during training (both on
:class:`PeriodicSamplingCallback`), the loss curve and ``L_t`` plots, throughput / MFU, preemption."""

from .ema import PAPER_EMA_DECAY, EMACallback
from .fid import FIDCallback
from .periodic import PeriodicSamplingCallback
from .posthoc_ema import PostHocEMACallback
from .preemption import PREEMPTED_EXIT_STATUS, PreemptionCallback
from .sample_grid import SampleGridCallback
from .throughput import ThroughputCallback
from .training_plots import TrainingPlotsCallback

__all__ = [
    "EMACallback",
    "FIDCallback",
    "PAPER_EMA_DECAY",
    "PREEMPTED_EXIT_STATUS",
    "PeriodicSamplingCallback",
    "PostHocEMACallback",
    "PreemptionCallback",
    "SampleGridCallback",
    "ThroughputCallback",
    "TrainingPlotsCallback",
]
