"""The loss curve and ``L_t`` PNGs: what a tiny fit writes beside its grid, and the data-to-pixel map."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger
from PIL import Image

from sit_lightning.callbacks import SampleGridCallback, TrainingPlotsCallback
from sit_lightning.callbacks.fid import FIDCallback
from sit_lightning.data import DigitsDataModule
from sit_lightning.evaluation.plots import (
    BACKGROUND,
    LINE_COLORS,
    PLOT_SIZE,
    PlotArea,
    Series,
    line_plot,
    nice_ticks,
    plot_area,
    save_plot,
)
from sit_lightning.sampling import SamplerSettings
from tiny_digits import fit_module, quiet_trainer

LOG_EVERY = 2
STEPS = 7  # logging steps 2, 4, 6; a validation (the L_t profile) at step 7


class RecordingLogger(Logger):
    """Keeps what Lightning sends to its loggers."""

    def __init__(self, root) -> None:
        super().__init__()
        self.root = root
        self.logged: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @property
    def log_dir(self) -> str:
        return str(self.root)

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    torch.manual_seed(0)
    module = fit_module()
    plots = TrainingPlotsCallback()
    grid = SampleGridCallback(
        every_n_steps=0, num_per_class=1, settings=SamplerSettings(method="euler", steps=1)
    )
    logger = RecordingLogger(root / "run")
    trainer = quiet_trainer(
        root, max_steps=STEPS, logger=logger, callbacks=[plots, grid], log_every_n_steps=LOG_EVERY,
        val_check_interval=STEPS, limit_val_batches=1, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=DigitsDataModule(global_batch_size=16, val_global_batch_size=16))
    return module, trainer, plots, grid, logger


def _pixels(path) -> np.ndarray:
    image = Image.open(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def _hits(pixels: np.ndarray, area: PlotArea, series: Series, color) -> None:
    for x, y in zip(series.x, series.y, strict=True):
        column, row = area.to_pixel(x, y)
        assert tuple(pixels[row, column]) == color, (x, y, column, row)


def test_the_pngs_sit_beside_the_grid_and_show_the_logged_losses_and_the_profile(fitted):
    module, trainer, plots, grid, logger = fitted
    logged = [(step, m["train/loss"]) for step, m in logger.logged if "train/loss" in m]
    assert [s for s, _ in logged] == [1, 3, 5]  # Lightning's loggers write optimizer step - 1
    # the callback holds exactly the logged values, at the optimizer steps taken
    assert plots.steps == [2, 4, 6] and plots.losses == [v for _, v in logged]
    curve, profile = plots.paths["loss_curve"], plots.paths["loss_profile"]
    assert curve.name == "loss_curve.png" and profile.name == "loss_profile.png"
    assert curve.parent == profile.parent == grid.last_path.parent

    # the curve's PNG: the documented size, not blank, and the logged losses at their pixels
    pixels = _pixels(curve)
    assert pixels.shape == (PLOT_SIZE[1], PLOT_SIZE[0], 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # text, grid, frame, line
    data = Series("train/loss", [s + 1 for s, _ in logged], [v for _, v in logged])
    _hits(pixels, plot_area([data]), data, LINE_COLORS[0])
    assert len({round(v, 6) for _, v in logged}) == 3  # PRECONDITION: three different heights

    # the profile's PNG: the module's L_t
    times, values = module.loss_profile
    assert plots.profile_step == STEPS and values.std() > 0
    data = Series("L_t", times.tolist(), values.tolist())
    pixels = _pixels(profile)
    assert pixels.shape == (PLOT_SIZE[1], PLOT_SIZE[0], 3)
    _hits(pixels, plot_area([data], x_range=(0.0, 1.0)), data, LINE_COLORS[0])

    # the demo's final report names both files
    report = FIDCallback(num_samples=10).summary(trainer, [])
    assert f"loss curve       : {curve}" in report and f"loss profile L_t : {profile}" in report


def test_a_known_series_hits_known_pixels(tmp_path):
    area = PlotArea(left=10, top=5, right=110, bottom=55, x_range=(0.0, 10.0), y_range=(-1.0, 1.0))
    assert area.to_pixel(0, -1) == (10, 55) and area.to_pixel(10, 1) == (110, 5)
    assert area.to_pixel(5, 0) == (60, 30) and area.to_pixel(2.5, 0.5) == (35, 18)

    # a line from (0, 0) up to (4, 2), a gap at x = 5 (NaN), then (6, 2) to (8, 0), on fixed ranges
    series = Series("s", [0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 0.5, 1, 1.5, 2, math.nan, 2, 1, 0])
    plot = line_plot([series], title="t", x_label="x", y_label="y", x_range=(0, 8), y_range=(0, 2))
    area = plot.area
    assert (area.left, area.top, area.right, area.bottom) == (78, 40, 615, 343)  # 640 x 400 less margins
    assert area.to_pixel(4, 2) == (346, 40) and area.to_pixel(0, 0) == (78, 343)  # 78 + 4/8 * 537
    pixels = np.asarray(Image.open(save_plot(plot, tmp_path / "p.png")))
    assert pixels.shape == (400, 640, 3)
    _hits(
        pixels, area, Series("finite", [0, 1, 2, 3, 4, 6, 7, 8], [0, 0.5, 1, 1.5, 2, 2, 1, 0]), LINE_COLORS[0]
    )
    middle = area.to_pixel(2, 1)  # on the line between two points
    assert tuple(pixels[middle[1], middle[0]]) == LINE_COLORS[0]
    # no line across the NaN: the middle of (4, 2) -> (6, 2) is background
    gap = area.to_pixel(5, 2)
    assert tuple(pixels[gap[1] + 3, gap[0]]) == BACKGROUND
    # two series: the second in the second colour
    two = line_plot(
        [series, Series("t", [0, 8], [1, 1])], title="t", x_label="x", y_label="y", y_range=(0, 2)
    )
    column, row = two.area.to_pixel(8, 1)
    assert tuple(np.asarray(two.image)[row, column]) == LINE_COLORS[1]


def test_ticks_are_round_numbers_inside_the_range():
    assert nice_ticks(0.27, 1.51) == [0.4, 0.6, 0.8, 1.0, 1.2, 1.4]
    assert nice_ticks(20, 1200) == [200, 400, 600, 800, 1000, 1200]
    assert nice_ticks(-0.3, 0.3) == [-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3]
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_plots_need_pillow_only(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it would now fail
    plot = line_plot([Series("a", [0, 1], [1, 2])], title="t", x_label="x", y_label="y")
    assert save_plot(plot, tmp_path / "a" / "b.png").is_file()


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="3 x values but 2 y values"):
        Series("s", [0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="1 to 2 series; got 3"):
        line_plot([Series("s", [0], [0])] * 3, title="t", x_label="x", y_label="y")
    with pytest.raises(ValueError, match="no finite points"):
        line_plot([Series("s", [0], [math.inf])], title="t", x_label="x", y_label="y")
    with pytest.raises(ValueError, match="every_n_steps must be >= 0; got -1"):
        TrainingPlotsCallback(every_n_steps=-1)


def test_the_curve_survives_a_resume():
    plots = TrainingPlotsCallback()
    plots.steps, plots._values = [20, 40], [torch.tensor(1.5), torch.tensor(0.75)]
    state = plots.state_dict()
    assert state == {"steps": [20, 40], "losses": [1.5, 0.75], "profile_step": None}
    resumed = TrainingPlotsCallback()
    resumed.load_state_dict(state)
    assert resumed.steps == [20, 40] and resumed.losses == [1.5, 0.75]
