"""ImageFolder scanning and the ADM centre crop, with Pillow only (no torchvision).

The released SiT training reads ``torchvision.datasets.ImageFolder(data_path)`` and applies
``center_crop_arr`` from ADM (guided-diffusion), ``ToTensor`` and ``Normalize([0.5]*3, [0.5]*3)``;
:func:`scan_image_folder`, :func:`center_crop_arr` and :func:`to_model_input` reproduce those steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderScan",
    "scan_image_folder",
    "center_crop_arr",
    "load_image",
    "to_model_input",
]

# torchvision's IMG_EXTENSIONS, matched case-insensitively as ImageFolder does
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
UINT8_MAX = 255.0


@dataclass(frozen=True)
class ImageFolderScan:
    """Sorted class names (label ``i`` = ``class_names[i]``) and ``(path, label)`` per image, in a fixed order."""

    root: Path
    class_names: list[str]
    paths: list[Path]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.paths)


def scan_image_folder(root: str | os.PathLike) -> ImageFolderScan:
    """List an ImageFolder tree ``root/<class>/**/<image>`` as torchvision does.

    Classes are the sub-folders of ``root`` in sorted order; images are found recursively (following
    links) and sorted by path within each class.

    Raises:
        FileNotFoundError: ``root`` has no class folders, or a class folder holds no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    class_names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not class_names:
        raise FileNotFoundError(f"no class sub-folders in {root} (expected root/<class>/<image>)")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        found = []
        for dirpath, _, filenames in os.walk(root / name, followlinks=True):
            found += [Path(dirpath) / f for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise FileNotFoundError(
                f"class folder {root / name} holds no image with extension in {IMAGE_EXTENSIONS}"
            )
        found.sort()
        paths += found
        labels += [label] * len(found)
    return ImageFolderScan(root, class_names, paths, labels)


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM centre crop: BOX-halve while the short side >= 2 * size, BICUBIC-resize the short side to
    ``image_size``, then crop the centre ``image_size x image_size`` (offsets rounded down).

    Halving first with a box filter avoids the aliasing of one big bicubic step (guided-diffusion,
    ``image_datasets.center_crop_arr``; used by DiT and SiT).
    """
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def load_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Read an image as RGB (ImageFolder's loader) and centre-crop it: ``(size, size, 3)`` uint8."""
    with Image.open(path) as image:
        return np.array(center_crop_arr(image.convert("RGB"), image_size))  # a writable copy


def to_model_input(images: np.ndarray | Tensor) -> Tensor:
    """uint8 ``(n, H, W, 3)`` -> float32 ``(n, 3, H, W)`` in [-1, 1] (``ToTensor`` then ``Normalize(0.5, 0.5)``)."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).to(torch.float32) / UINT8_MAX
    return (x - 0.5) / 0.5
