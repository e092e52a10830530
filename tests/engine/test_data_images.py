"""Image loading: DICOM windowing against pydicom's own VOI functions, PNG/JPEG, normalization, errors."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pefomed.engine.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    ImageLoadError,
    dicom_to_uint8,
    dicom_to_unit,
    load_image,
    to_tensor,
    voi_window,
)

pydicom = pytest.importorskip("pydicom")
from pydicom.pixels import apply_modality_lut, apply_windowing  # noqa: E402


def pydicom_unit(ds) -> np.ndarray:
    """Reference: pydicom's modality LUT then windowing, scaled from its output range to [0, 1]."""
    values = apply_modality_lut(ds.pixel_array, ds)
    windowed = apply_windowing(values.astype(np.float64), ds)
    bits = ds.BitsStored
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2**bits - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        low, high = low * ds.RescaleSlope + ds.RescaleIntercept, high * ds.RescaleSlope + ds.RescaleIntercept
    return (windowed - low) / (high - low)


def test_mr_window_from_header_matches_pydicom():
    path = pydicom.data.get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" in ds and "RescaleSlope" not in ds
    np.testing.assert_allclose(dicom_to_unit(path), pydicom_unit(ds), atol=1e-12)
    # and a hand computation of the LINEAR window (DICOM PS3.3 C.11.2.1.2.1)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    x = ds.pixel_array.astype(np.float64)
    manual = np.where(x <= c - 0.5 - (w - 1) / 2, 0.0, np.where(x > c - 0.5 + (w - 1) / 2, 1.0, (x - (c - 0.5)) / (w - 1) + 0.5))
    np.testing.assert_allclose(dicom_to_unit(path), manual, atol=1e-12)
    assert np.array_equal(dicom_to_uint8(path), np.round(manual * 255).astype(np.uint8))


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_ct_rescale_then_window_matches_pydicom(tmp_path, function):
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    assert float(ds.RescaleIntercept) == -1024.0  # the rescale matters: raw values are not HU
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 40, 400, function
    path = tmp_path / "ct_window.dcm"
    ds.save_as(path)
    np.testing.assert_allclose(dicom_to_unit(path), pydicom_unit(pydicom.dcmread(path)), atol=1e-12)
    hu = ds.pixel_array * 1.0 - 1024.0
    assert (dicom_to_unit(path)[hu < -300] < 0.05).all() and (dicom_to_unit(path)[hu > 400] > 0.95).all()


def test_ct_without_window_is_stretched_min_to_max():
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(dicom_to_unit(path), (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-12)


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    np.testing.assert_allclose(dicom_to_unit(tmp_path / "m1.dcm"), 1.0 - pydicom_unit(ds), atol=1e-12)


def test_dicom_tensor_shape_and_range():
    x = load_image(pydicom.data.get_testdata_file("MR_small.dcm"), 24)
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    torch.testing.assert_close(x[0] * CLIP_STD[0] + CLIP_MEAN[0], x[1] * CLIP_STD[1] + CLIP_MEAN[1], atol=1e-5, rtol=0)  # grey
    for c in range(3):
        unit = x[c] * CLIP_STD[c] + CLIP_MEAN[c]
        assert unit.min() >= -0.05 and unit.max() <= 1.05  # bicubic overshoots a little


def test_constant_grey_png_normalizes_exactly(tmp_path):
    Image.fromarray(np.full((10, 14), 200, np.uint8), mode="L").save(tmp_path / "grey.png")
    x = load_image(tmp_path / "grey.png", 16)
    for c in range(3):
        torch.testing.assert_close(x[c], torch.full((16, 16), (200 / 255 - CLIP_MEAN[c]) / CLIP_STD[c]), rtol=0, atol=1e-5)


def test_jpeg_grey_and_rgb_and_16_bit(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 255
    Image.fromarray(rgb).save(tmp_path / "green.png")
    x = load_image(tmp_path / "green.png", 8)
    torch.testing.assert_close(x[1], torch.full((8, 8), (1 - CLIP_MEAN[1]) / CLIP_STD[1]))
    torch.testing.assert_close(x[0], torch.full((8, 8), -CLIP_MEAN[0] / CLIP_STD[0]))
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    deep = load_image(tmp_path / "deep.png", 8)[0] * CLIP_STD[0] + CLIP_MEAN[0]
    torch.testing.assert_close(deep, torch.from_numpy(np.round(ramp / ramp.max() * 255) / 255).float(), atol=1e-5, rtol=0)
    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(tmp_path / "a.jpg", quality=95)
    assert load_image(tmp_path / "a.jpg", 8).shape == (3, 8, 8)


def test_voi_window_rejects_bad_headers():
    with pytest.raises(ValueError, match="must be >= 1 for LINEAR"):
        voi_window(np.zeros(3), 0, 0.5)
    with pytest.raises(ValueError, match="VOI LUT Function 'CURVE'"):
        voi_window(np.zeros(3), 0, 10, "CURVE")


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match=r"nowhere\.png: image file not found"):
        load_image(tmp_path / "nowhere.png", 8)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match=r"broken\.png: cannot decode the image: not an image format PIL reads"):
        load_image(tmp_path / "broken.png", 8)
    (tmp_path / "IM0002").write_bytes(b"\0" * 200)  # no extension, neither an image nor DICOM
    with pytest.raises(ImageLoadError, match=r"IM0002: cannot decode the image: .* no DICOM 'DICM' marker at byte 128"):
        load_image(tmp_path / "IM0002", 8)


def test_dicom_without_extension_is_recognised_by_its_preamble(tmp_path):
    """PACS exports are named IM0001 or by instance UID (whose last dotted part looks like a suffix)."""
    original = pydicom.data.get_testdata_file("CT_small.dcm")
    expected = load_image(original, 16)
    for name in ("IM0001", "1.2.840.113619.2.55.3.604688119", "ct.png"):  # the content decides, not the name
        shutil.copy(original, tmp_path / name)
        torch.testing.assert_close(load_image(tmp_path / name, 16), expected, rtol=0, atol=0)
    ds = pydicom.dcmread(original)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    unit = (hu - hu.min()) / (hu.max() - hu.min())  # CT_small has no window: min-max stretch
    reference = to_tensor(Image.fromarray(np.round(unit * 255).astype(np.uint8)).convert("RGB"), 16)
    torch.testing.assert_close(load_image(tmp_path / "IM0001", 16), reference, rtol=0, atol=0)


@pytest.mark.parametrize("content", ["zeros", "png"])
def test_a_dcm_that_is_not_dicom_is_refused_naming_the_file(tmp_path, content):
    path = tmp_path / "scan.dcm"
    if content == "png":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "scan.png")
        path.write_bytes((tmp_path / "scan.png").read_bytes())
    else:
        path.write_bytes(b"\0" * 200)
    with pytest.raises(ImageLoadError) as err:
        load_image(path, 8)
    message = str(err.value)
    assert message.startswith(f"{path}: not a DICOM file: there is no 'DICM' marker at byte 128")
    assert "force" not in message and "\n" not in message  # ours, not pydicom's advice


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("DICOM", ".dcm")])
def test_truncated_files_are_an_image_load_error_naming_the_file(tmp_path, fmt, suffix):
    path = tmp_path / f"cut{suffix}"
    if fmt == "DICOM":
        whole = (Path(pydicom.data.get_testdata_file("CT_small.dcm"))).read_bytes()
    else:
        noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / f"whole{suffix}", fmt)
        whole = (tmp_path / f"whole{suffix}").read_bytes()
        assert load_image(tmp_path / f"whole{suffix}", 8).shape == (3, 8, 8)
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageLoadError) as err:
        load_image(path, 8)
    message = str(err.value)
    assert message.startswith(f"{path}: cannot ")
    assert ("truncated" in message) if fmt != "DICOM" else ("less than expected" in message)
