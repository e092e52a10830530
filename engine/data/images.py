"""Image loading without torchvision: PNG/JPEG through PIL, DICOM through pydicom.

DICOM is recognised by its content (the `DICM` marker after the 128-byte preamble), so PACS
exports without an extension (`IM0001`) are read as DICOM; a `.dcm` without the marker, a
truncated PNG/JPEG and a broken DICOM are each an `ImageLoadError` naming the file.

DICOM pixels go through the modality rescale (slope/intercept), then the VOI window from the
header (Window Center/Width with the VOI LUT Function: LINEAR, the default, LINEAR_EXACT or
SIGMOID, as DICOM PS3.3 C.11.2.1 defines them), or a min-max stretch when the header has no
window. MONOCHROME1 is inverted so that bright always means dense; a multi-frame file gives its
middle frame.

The tensor is MiniGPT-v2's evaluation transform: grey-scale to RGB, bicubic resize to the square
input size, scale to [0, 1], normalize with the EVA/CLIP mean and std.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pefomed.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DICOM_SUFFIXES = (".dcm", ".dicom")
DICOM_PREAMBLE = 128  # bytes before the "DICM" marker of a DICOM Part 10 file (PS3.10 7.1)
DICOM_MAGIC = b"DICM"


class ImageLoadError(UserError, ValueError):
    """An image that is missing or cannot be decoded; the message starts with its path."""


def _first(value) -> float:
    """Window Center/Width may hold several alternative views (VM > 1); the first is the default."""
    try:
        return float(value)
    except TypeError:
        return float(value[0])


def voi_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI windowing of modality values to [0, 1] (PS3.3 C.11.2.1.2 and C.11.2.1.3)."""
    function = function.upper()
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"Window Width {width} must be > 0 for SIGMOID")
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"Window Width {width} must be >= 1 for LINEAR")
        center, width = center - 0.5, width - 1.0
    elif function != "LINEAR_EXACT":
        raise ValueError(f"VOI LUT Function {function!r} is not LINEAR, LINEAR_EXACT or SIGMOID")
    if width <= 0:  # LINEAR with width 1 or LINEAR_EXACT with width 0: a hard threshold
        return (values > center).astype(np.float64)
    return np.clip((values - center) / width + 0.5, 0.0, 1.0)


def dicom_to_unit(path: str | Path) -> np.ndarray:
    """A DICOM file's displayed grey levels in [0, 1] (2-D), or RGB [H, W, 3] for colour files."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    pixels = ds.pixel_array
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[pixels.shape[0] // 2]
    if int(getattr(ds, "SamplesPerPixel", 1)) == 3:
        return pixels.astype(np.float64) / float(np.iinfo(pixels.dtype).max if pixels.dtype.kind in "ui" else 1.0)
    values = pixels.astype(np.float64) * float(ds.get("RescaleSlope", 1.0) or 1.0) + float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        unit = voi_window(values, _first(ds.WindowCenter), _first(ds.WindowWidth), str(ds.get("VOILUTFunction", "LINEAR")))
    else:
        low, high = float(values.min()), float(values.max())
        unit = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
        unit = 1.0 - unit
    return unit


def dicom_to_uint8(path: str | Path) -> np.ndarray:
    return (dicom_to_unit(path) * 255.0).round().astype(np.uint8)


def is_dicom(head: bytes) -> bool:
    """Whether a file's first bytes are a DICOM Part 10 header: a 128-byte preamble, then `DICM`."""
    return head[DICOM_PREAMBLE:DICOM_PREAMBLE + len(DICOM_MAGIC)] == DICOM_MAGIC


def open_image(path: str | Path) -> Image.Image:
    """An RGB PIL image from PNG/JPEG (any mode) or DICOM; `ImageLoadError` names path and reason.

    A file is DICOM when it carries the `DICM` marker at byte 128, whatever its name: PACS
    exports are often named `IM0001` or by their instance UID. A `.dcm` without the marker is not
    read as DICOM (pydicom would only guess at it) and is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"{path}: image file not found")
    try:
        with path.open("rb") as f:
            head = f.read(DICOM_PREAMBLE + len(DICOM_MAGIC))
    except OSError as e:
        raise ImageLoadError(f"{path}: cannot read the file ({e.strerror or e})") from e
    if not is_dicom(head) and path.suffix.lower() in DICOM_SUFFIXES:
        raise ImageLoadError(
            f"{path}: not a DICOM file: there is no 'DICM' marker at byte 128 (a DICOM Part 10 file starts with a "
            "128-byte preamble and 'DICM'); export it again as DICOM Part 10, or convert it to PNG"
        )
    try:
        if is_dicom(head):
            return Image.fromarray(dicom_to_uint8(path)).convert("RGB")
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I", "F"):
                # 16-bit and float PNGs: convert("L") would clip at 255, so stretch to 8 bits first.
                arr = np.asarray(img, dtype=np.float64)
                low, high = float(arr.min()), float(arr.max())
                arr = (arr - low) / (high - low) if high > low else np.zeros_like(arr)
                return Image.fromarray((arr * 255.0).round().astype(np.uint8)).convert("RGB")
            return img.convert("RGB")
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{path}: cannot decode the image: not an image format PIL reads (PNG, JPEG, ...) and "
                             "no DICOM 'DICM' marker at byte 128") from e
    except (OSError, SyntaxError, EOFError) as e:  # PIL: truncated or corrupt data ("image file is truncated")
        raise ImageLoadError(f"{path}: cannot decode the image ({e}); the file is damaged or incomplete: "
                             "copy it again or remove it from the dataset") from e
    except Exception as e:  # pydicom raises many types for broken files (InvalidDicomError, ValueError, ...)
        raise ImageLoadError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from e


def to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Bicubic resize to size x size, [0, 1], then the EVA/CLIP normalization: float [3, size, size]."""
    img = img.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy() / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """The model input for one image file: float [3, size, size]."""
    return to_tensor(open_image(path), size)
