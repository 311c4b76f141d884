"""NIfTI in and out (nibabel): a 2D image, or a 3D volume cut into 2D slices along one axis.

A slice is shown the way viewers show it (rows run along the second remaining voxel axis, top
row last), and its mask goes back through the exact inverse, so the mask NIfTI has the input's
shape and affine voxel for voxel.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from cp_deploy.errors import InputError, MissingExtraError
from cp_deploy.files import check_pixel_budget
from cp_deploy.formats.base import Decoded, ReadOptions

EXTRA = "nifti"
AXIS_NAMES = "xyz"


def slice_to_image(s: np.ndarray) -> np.ndarray:
    """A 2D slice in voxel order -> image rows and columns as a viewer shows them."""
    return np.ascontiguousarray(np.flipud(s.T))


def image_to_slice(m: np.ndarray) -> np.ndarray:
    """The inverse of :func:`slice_to_image`."""
    return np.ascontiguousarray(np.flipud(m).T)


def default_slice_axis(shape: tuple[int, ...], zooms: tuple[float, ...]) -> int:
    """A singleton axis if there is one (a 2D image stored as 3D), else the axis of largest
    voxel spacing (lowest resolution: the acquisition's slice direction); ties go to the last."""
    for a in (2, 1, 0):
        if shape[a] == 1:
            return a
    return max(range(3), key=lambda a: (float(zooms[a]), a))


def read_nifti(path: str | Path, options: ReadOptions | None = None) -> Decoded:
    """One NIfTI file -> a 2D image, or one image per slice of a 3D volume, with a write-back to a
    uint8 mask NIfTI of the same shape and affine."""
    path = Path(path)
    options = options or ReadOptions()
    try:
        import nibabel as nib
    except ImportError:
        raise MissingExtraError.for_file(path, "NIfTI files", EXTRA) from None
    try:
        img = nib.load(str(path))  # reads the header only
    except Exception as e:
        raise InputError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    # Before the voxels are read: the largest plane any slicing of the header's shape can give.
    h, w = (1, 1, *sorted(int(n) for n in img.shape[:3]))[-2:]
    check_pixel_budget(path, w, h, options.max_pixels, f"shape {tuple(img.shape)}, slices")
    try:
        data = np.asanyarray(img.dataobj)  # applies scl_slope/scl_inter
    except Exception as e:
        raise InputError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.dtype.fields is not None or data.ndim not in (2, 3):
        raise InputError(
            f"{path}: NIfTI of shape {shape} and type {data.dtype} is not supported; "
            "expected a 2D image or a 3D scalar volume"
        )
    if data.ndim == 2:
        frames, labels, axis = [slice_to_image(data)], [""], None
    else:
        zooms = tuple(img.header.get_zooms()[:3])
        axis = default_slice_axis(data.shape, zooms) if options.slice_axis is None else options.slice_axis
        if axis not in (0, 1, 2):
            raise InputError(f"--slice-axis must be 0, 1 or 2, got {axis}")
        n = data.shape[axis]
        width = max(3, len(str(n - 1)))
        frames = [slice_to_image(np.take(data, k, axis=axis)) for k in range(n)]
        labels = [""] if n == 1 else [f"{AXIS_NAMES[axis]}{k:0{width}d}" for k in range(n)]

    def write_back(masks: list[np.ndarray]) -> dict[str, tuple[str, bytes]]:
        slices = [image_to_slice(np.asarray(m, bool)) for m in masks]
        vol = slices[0] if axis is None else np.stack(slices, axis=axis)
        vol = vol.reshape(shape).astype(np.uint8)
        out = type(img)(vol, img.affine, img.header.copy())
        out.set_data_dtype(np.uint8)
        out.header.set_slope_inter(1.0, 0.0)
        # .nii.gz out, whatever came in: masks compress to almost nothing.
        return {"nifti": (".nii.gz", gzip.compress(out.to_bytes(), compresslevel=6))}

    info: dict = {"format": "nifti", "shape": list(shape)}
    if axis is not None:
        info["slice_axis"] = axis
    return Decoded(frames=frames, labels=labels, write_back=write_back, info=info)
