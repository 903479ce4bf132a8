"""Lightning callbacks: EMA of the weights (and sample grids, FID, throughput)."""

from .ema import PAPER_EMA_DECAY, EMACallback

__all__ = ["EMACallback", "PAPER_EMA_DECAY"]
