"""The data set base class every format shares: ids, classes, and the transforms.

Every item is `(image, mask)`: image float32 [3, H, W] normalised with the ImageNet mean/std that
torchvision's segmentation models expect, mask int64 [H, W] of class indices, `ignore_index` (255)
where a pixel must not count.

Transforms. Evaluation resizes to input_size (bilinear image, nearest mask; a different aspect ratio is
stretched, never cropped) with PIL's fixed-point resampling and a lookup-table normalisation, so the same
image gives bit-identical tensors on every call, worker and machine. Training draws a scale in
[0.5, 2.0] of input_size, pads (image with the mean, mask with ignore), takes a random input_size crop and
flips horizontally with probability 0.5; the draws come from torch's global RNG, which DataLoader seeds
per worker from its generator, so a seeded loader is reproducible.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE = 255  # ignore value inside the loaders; replaced by the caller's ignore_index at the end


def _normalise_lut() -> np.ndarray:
    # Exactly torchvision's ToTensor (x / 255 in float32) then Normalize ((x - mean) / std), tabulated.
    x = torch.arange(256, dtype=torch.float32).div(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None]
    return ((x[None, :] - mean) / std).numpy()


_LUT = _normalise_lut()  # [3, 256] float32


def normalise_image(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float32 3xHxW normalised with the ImageNet mean/std (exact, via a lookup table)."""
    out = np.empty((3,) + img.shape[:2], dtype=np.float32)
    for c in range(3):
        out[c] = _LUT[c][img[..., c]]
    return torch.from_numpy(out)


def _resize(img: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    if img.shape[:2] == tuple(size):
        return img, mask
    h, w = size
    img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    return img, mask


def transform_pair(img: np.ndarray, mask: np.ndarray, input_size: tuple[int, int], train: bool,
                   ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 HxWx3 image + uint8 HxW mask (255 = ignore) -> normalised float32 image, int64 mask."""
    H, W = input_size
    if not train:
        img, mask = _resize(img, mask, (H, W))
        image, target = normalise_image(img), torch.from_numpy(mask.astype(np.int64))
    else:
        s = 0.5 + 1.5 * float(torch.rand(()))
        img, mask = _resize(img, mask, (max(1, round(H * s)), max(1, round(W * s))))
        image, target = normalise_image(img), torch.from_numpy(mask.astype(np.int64))
        h, w = target.shape
        if h < H or w < W:  # pad bottom/right like torchvision's references: mean colour, ignore label
            ph, pw = max(0, H - h), max(0, W - w)
            image = torch.nn.functional.pad(image, (0, pw, 0, ph), value=0.0)
            target = torch.nn.functional.pad(target, (0, pw, 0, ph), value=IGNORE)
            h, w = target.shape
        top = int(torch.randint(0, h - H + 1, ()))
        left = int(torch.randint(0, w - W + 1, ()))
        image = image[:, top:top + H, left:left + W]
        target = target[top:top + H, left:left + W]
        if float(torch.rand(())) < 0.5:
            image, target = image.flip(-1), target.flip(-1)
        image, target = image.contiguous(), target.contiguous()
    if ignore_index != IGNORE:
        target[target == IGNORE] = ignore_index
    return image, target


class SegDataset(torch.utils.data.Dataset):
    """Common part of every data set: ids, classes, transforms. Subclasses implement `load(i)`."""

    kind = "?"

    def __init__(self, split: str, input_size, train: bool, ignore_index: int, num_classes: int,
                 class_names: list[str], image_ids: list[str]):
        self.split = split
        self.input_size = _check_size(input_size)
        self.train = bool(train)
        self.num_classes = int(num_classes)
        self.class_names = list(class_names)
        self.image_ids = list(image_ids)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)) \
                or 0 <= ignore_index < self.num_classes:
            raise DataError(f"ignore_index={ignore_index!r} must be an integer outside 0..{self.num_classes - 1}")
        self.ignore_index = int(ignore_index)

    def __len__(self) -> int:
        return len(self.image_ids)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Item i before transforms: uint8 HxWx3 image, uint8 HxW mask of class indices (255 = ignore)."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        img, mask = self.load(i % n)
        return transform_pair(img, mask, self.input_size, self.train, self.ignore_index)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, images={len(self)}, classes={self.num_classes}, "
                f"input_size={self.input_size}, train={self.train})")


def _check_size(input_size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in input_size)
    except (TypeError, ValueError):
        raise DataError(f"input_size={input_size!r} must be two positive integers (H, W)") from None
    if h < 1 or w < 1:
        raise DataError(f"input_size={input_size!r} must be two positive integers (H, W)")
    return h, w
