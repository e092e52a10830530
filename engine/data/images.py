"""Image loading without torchvision: PNG/JPEG through PIL, DICOM through pydicom.

The preprocessing is MiniGPT-v2's evaluation transform: bicubic resize to the square input
size, scale to [0, 1], normalize with the EVA/CLIP mean and std.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageLoadError(ValueError):
    """An image that is missing or cannot be decoded."""


def _first(value) -> float:
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def dicom_to_uint8(path: str | Path) -> np.ndarray:
    """Modality rescale, then the VOI window from the header (min-max when there is none)."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    pixels = ds.pixel_array.astype(np.float64)
    pixels = pixels * float(getattr(ds, "RescaleSlope", 1.0)) + float(getattr(ds, "RescaleIntercept", 0.0))
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        low, high = center - width / 2.0, center + width / 2.0
    else:
        low, high = float(pixels.min()), float(pixels.max())
    scaled = (np.clip(pixels, low, high) - low) / max(high - low, 1e-6)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        scaled = 1.0 - scaled
    if scaled.ndim == 3 and scaled.shape[-1] != 3:  # multi-frame: take the middle frame
        scaled = scaled[scaled.shape[0] // 2]
    return (scaled * 255.0).round().astype(np.uint8)


def open_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(f"{path}: image file not found")
    try:
        if path.suffix.lower() in (".dcm", ".dicom"):
            return Image.fromarray(dicom_to_uint8(path)).convert("RGB")
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, AttributeError) as e:
        raise ImageLoadError(f"{path}: cannot read the image ({e})") from e


def to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def load_image(path: str | Path, size: int) -> torch.Tensor:
    return to_tensor(open_image(path), size)
