"""What the rest of sit-lightning reads from a data module, written down as protocols.

A data module is any ``LightningDataModule`` that yields batches
``{"x": (b, C, H, W) float32, "y": (b,) int64, "key": (b,) int64}``. Beyond its batches, two readers
ask it for more:

- :class:`TrainingData` (``latent_shape``, ``num_classes``): ``SiTModule.setup`` checks the data
  against the network before the first step.
- :class:`RealTrainImages` (``train_images()``): ``FIDCallback`` trains the digits judge on them
  (``feature="digits"``) and scores them against the reference (the floor).
- :class:`RealTestImages` (``test_images()``): ``FIDCallback`` computes the reference statistics from
  them when no ``reference_stats`` file is given.

:class:`EvaluationImages` is both image protocols: what ``FIDCallback`` needs with its defaults.
:class:`~sit_lightning.data.LatentDataModule` is :class:`TrainingData` (latents have no pixel images
to score); :class:`~sit_lightning.data.DigitsDataModule` is all of them.

A reader checks a protocol with :func:`require`, which raises a ``TypeError`` naming the data module's
class, what it lacks and what the reader needs it for, instead of skipping the check. (The datamodules'
own base, :class:`~sit_lightning.data.stream.SampleStreamDataModule`, asks its subclasses for
``train_source()`` / ``val_source()``: an inner contract, typed there by ``SampleSource``.)

The protocols are ``runtime_checkable``, but ``isinstance`` evaluates properties on Python 3.11
(``LatentDataModule.latent_shape`` opens the shard index); :func:`missing` and :func:`require` look
members up without calling them.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Generic, NamedTuple, Protocol, TypeVar, cast, runtime_checkable

if TYPE_CHECKING:  # the contract is plain typing: reading it imports neither torch nor Lightning
    from torch import Tensor

__all__ = [
    "EvaluationImages",
    "LabelledImages",
    "RealTestImages",
    "RealTrainImages",
    "TrainingData",
    "missing",
    "require",
]


class LabelledImages(NamedTuple):
    """Real images and their labels.

    Attributes:
        x: ``(n, C, H, W)`` float32 pixels in [-1, 1] (what the model's decoded samples look like).
        y: ``(n,)`` int64 class labels.
    """

    x: Tensor
    y: Tensor


@runtime_checkable
class TrainingData(Protocol):
    """The shape of one sample and the number of classes, known before any batch is loaded.

    Attributes:
        latent_shape: ``(C, H, W)`` of one training sample ``x`` (a latent, or pixels for the digits).
        num_classes: labels ``y`` lie in ``[0, num_classes)``.
    """

    @property
    def latent_shape(self) -> tuple[int, ...]: ...

    @property
    def num_classes(self) -> int: ...


@runtime_checkable
class RealTrainImages(Protocol):
    """The real images of the training split, in pixel space."""

    def train_images(self) -> LabelledImages:
        """``(n, C, H, W)`` float32 images in [-1, 1] and their ``(n,)`` labels."""
        ...


@runtime_checkable
class RealTestImages(Protocol):
    """Real images held out from training (the FID reference set), in pixel space."""

    def test_images(self) -> LabelledImages:
        """``(n, C, H, W)`` float32 images in [-1, 1] and their ``(n,)`` labels."""
        ...


@runtime_checkable
class EvaluationImages(RealTrainImages, RealTestImages, Protocol):
    """Both splits of real images: what ``FIDCallback`` reads with its default settings."""


_Contract = TypeVar("_Contract")
_NOT_MEMBERS = (object, Protocol, Generic)


def _members(contract: type) -> list[str]:
    """Public names a protocol declares, its own first, then its bases' in the order of its bases."""
    names: dict[str, None] = {}
    for klass in contract.__mro__:
        if klass in _NOT_MEMBERS:
            continue
        declared = [*vars(klass).get("__annotations__", {}), *vars(klass)]
        names.update(dict.fromkeys(n for n in declared if not n.startswith("_")))
    return list(names)


def missing(datamodule: object, contract: type) -> list[str]:
    """Members of the protocol ``contract`` that ``datamodule`` lacks (properties are not evaluated)."""
    lacking = []
    for name in _members(contract):
        try:
            inspect.getattr_static(datamodule, name)
        except AttributeError:
            lacking.append(name)
    return lacking


def _signature(contract: type) -> str:
    return ", ".join(
        f"{name}()" if inspect.isfunction(getattr(contract, name, None)) else name
        for name in _members(contract)
    )


def require(datamodule: object | None, contract: type[_Contract], *, for_what: str) -> _Contract:
    """``datamodule``, checked to offer every member of the protocol ``contract``.

    Args:
        datamodule: the trainer's data module (None when ``fit`` was given bare data loaders).
        contract: one of the protocols of this module.
        for_what: who needs it and why, for the message, e.g.
            ``"FIDCallback(feature='digits') (to train its judge classifier on the real training images)"``.

    Returns:
        ``datamodule``, typed as ``contract``.

    Raises:
        TypeError: naming the data module's class, the missing members and ``for_what``.
    """
    needs = f"{for_what} needs a data module with {_signature(contract)} ({contract.__name__}"
    where = " in sit_lightning.data.contract)"
    if datamodule is None:
        raise TypeError(f"{needs}{where}, but the trainer has no data module: pass datamodule= to fit")
    lacking = missing(datamodule, contract)
    if lacking:
        raise TypeError(f"{needs}{where}; {type(datamodule).__name__} has no {', '.join(lacking)}")
    return cast(_Contract, datamodule)
