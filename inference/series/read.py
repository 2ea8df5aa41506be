"""Reading a series: files -> image instances -> checked slices -> one decoded, ordered volume.

- every transfer syntax pydicom decodes (uncompressed, deflated, RLE, JPEG, JPEG-LS, JPEG 2000);
- the same SOP Instance UID twice is read once; non-image instances and localizers are left out;
- pixels are decoded (in threads, on every core the process may use) only for the slices kept, in
  stack order. JPEG 2000 goes through imagecodecs (``j2k``) when it is installed: pydicom's
  default plugin holds the GIL, so its threads would decode one slice at a time;
- a compressed instance the listener decoded while the series arrived (``decode_ahead``) is not
  decoded again: its stored values come from ``decoded``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_modality_lut
from pydicom.pixels.utils import get_expected_length

from vesalius.inference.device import usable_cores
from vesalius.inference.memory import release_free_memory
from vesalius.inference.series import decoded
from vesalius.inference.series.frames import Slice, frame_slices, instance_name, is_localizer
from vesalius.inference.series.geometry import stack_geometry
from vesalius.inference.series.j2k import PLUGIN as J2K_PLUGIN
from vesalius.inference.series.j2k import SYNTAXES as J2K_SYNTAXES
from vesalius.inference.series.j2k import register as register_j2k
from vesalius.inference.volume import Volume, VolumeError

# The largest instance the listener decodes ahead (a 2048 x 2048 slice is 8 MiB): a long compressed
# multi-frame instance can decode to gigabytes, which the listener must not hold.
DECODE_AHEAD_MAX_BYTES = 16 * 2**20

# Storage SOP classes that carry pixel data but are not slices of an image volume.
_NON_IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
        "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
        "1.2.840.10008.5.1.4.1.1.104.3",  # Encapsulated STL
        "1.2.840.10008.5.1.4.1.1.104.4",  # Encapsulated OBJ
        "1.2.840.10008.5.1.4.1.1.104.5",  # Encapsulated MTL
    }
)


def load_series(paths: Sequence[str | Path]) -> Volume:
    """Read a series from files and place it in space; raises VolumeError when it cannot.

    Non-image instances (SR, SEG, PR, ...) and localizers among ``paths`` are ignored, and an
    instance given twice is read once; the remaining slices (single-frame images or the frames of
    multi-frame ones) must form one stack whose geometry is checked rather than assumed.
    """
    try:
        return _load(paths, allow_int16=True)
    except _OutOfInt16:  # an integer rescale whose values leave int16 (rare): read again, in float32
        return _load(paths, allow_int16=False)


def _load(paths: Sequence[str | Path], allow_int16: bool) -> Volume:
    images = [ds for ds in _unique(_read_all(paths)) if _is_image(ds)]
    if not images:
        raise VolumeError("the series contains no image instances")
    _refuse_unsupported(images)
    slices = [piece for ds in images for piece in frame_slices(ds)]
    kept = [piece for piece in slices if not is_localizer(piece)]
    if not kept:
        raise VolumeError(f"the series holds only localizer images ({len(slices)})")
    order, affine = stack_geometry([piece.header for piece in kept])
    kept = [kept[i] for i in order]
    integer = allow_int16 and all(_integer_intercept(piece.header) is not None for piece in kept)
    array = _decode_all(kept, integer=integer)
    for ds in images:
        if "PixelData" in ds:  # the localizers'; the decoded instances gave theirs up already
            del ds.PixelData
    release_free_memory()  # the decoders' freed buffers, ~200 MB for 300 slices
    return Volume(array=array, affine=affine, sources=tuple(piece.header for piece in kept))


def _read_all(paths: Sequence[str | Path]) -> list[pydicom.Dataset]:
    """Whole files (pixel bytes stay encoded until we know which instances we keep)."""

    def read(path: str | Path) -> pydicom.Dataset:
        try:
            return pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise VolumeError(f"cannot read {Path(path).name} as DICOM: {exc}") from exc

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        return list(pool.map(read, paths))


def _workers() -> int:
    """Threads for reading and decoding: the cores this process may run on (its CPU affinity,
    which a container's cpuset or ``taskset`` sets), at most 8."""
    return min(8, usable_cores())


def _unique(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """One dataset per SOP Instance UID: an instance sent or copied twice is the same image."""
    seen: set[str] = set()
    unique = []
    for ds in datasets:
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid and uid in seen:
            continue
        seen.add(uid)
        unique.append(ds)
    return unique


def _is_image(ds: pydicom.Dataset) -> bool:
    return (
        "PixelData" in ds
        and "Rows" in ds
        and str(ds.get("SOPClassUID", "")) not in _NON_IMAGE_SOP_CLASSES
    )


def _refuse_unsupported(images: list[pydicom.Dataset]) -> None:
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in images}
    if len(series) > 1:
        raise VolumeError(f"mixed SeriesInstanceUID: {len(series)} series among the instances")
    for ds in images:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 and "PerFrameFunctionalGroupsSequence" not in ds:
            raise VolumeError(
                f"multi-frame instance {instance_name(ds)} has no per-frame geometry (functional groups); "
                "only enhanced/legacy-converted multi-frame images can be placed in space"
            )
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise VolumeError(
                f"colour images are not supported (PhotometricInterpretation "
                f"{ds.get('PhotometricInterpretation', '?')})"
            )
    frames = {str(ds.get("FrameOfReferenceUID", "")) for ds in images}
    if "" in frames:
        raise VolumeError("missing FrameOfReferenceUID: the series is not placed in patient space")
    if len(frames) > 1:
        raise VolumeError(f"mixed FrameOfReferenceUID: {len(frames)} frames of reference")


class _OutOfInt16(Exception):
    """A slice's modality values do not fit in int16."""


def _integer_intercept(header: pydicom.Dataset) -> int | None:
    """The Rescale Intercept when modality values are stored values plus an integer (slope 1, no
    Modality LUT), as in nearly every CT; None otherwise."""
    if "ModalityLUTSequence" in header:
        return None
    try:
        slope = float(header.get("RescaleSlope", 1) or 1)
        intercept = float(header.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return None
    return int(intercept) if slope == 1 and intercept.is_integer() else None


def _decode_all(slices: list[Slice], integer: bool) -> np.ndarray:
    """Modality values (rescale / Modality LUT applied), one instance per thread: int16 when
    ``integer`` (half the memory of float32, and exact), float32 otherwise. An instance's pixel
    data is let go as soon as its frames are copied out."""
    first = slices[0].header
    dtype = np.int16 if integer else np.float32
    out = np.empty((len(slices), int(first.Rows), int(first.Columns)), dtype=dtype)
    limits = np.iinfo(np.int16)
    by_instance: dict[int, list[int]] = {}
    for index, piece in enumerate(slices):
        by_instance.setdefault(id(piece.pixels), []).append(index)

    gil_free_j2k = register_j2k()

    def decode(indices: list[int]) -> None:
        ds = slices[indices[0]].pixels
        try:
            pixels = _decoded_ahead(ds)
            if pixels is None:
                pixels = _pixel_array(ds, gil_free_j2k)
        except Exception as exc:  # any decoder failure is a refusal with the reason
            raise VolumeError(
                f"cannot decode pixel data of instance {instance_name(ds)} (transfer syntax {_syntax(ds)}): "
                f"{exc}"
            ) from exc
        for index in indices:
            piece = slices[index]
            frame = pixels if piece.frame is None or pixels.ndim == 2 else pixels[piece.frame]
            if not integer:
                out[index] = apply_modality_lut(frame, piece.header)
                continue
            intercept = _integer_intercept(piece.header) or 0
            low, high = int(frame.min()) + intercept, int(frame.max()) + intercept
            if low < limits.min or high > limits.max:
                raise _OutOfInt16
            # summed in int32 chunk by chunk into the slice (checked above: it fits), no temporary
            np.add(frame, intercept, out=out[index], dtype=np.int32, casting="unsafe")
        del ds.PixelData  # and pydicom's cached pixel array with it (a fallback reads the files again)

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        list(pool.map(decode, by_instance.values()))
    return out


def decode_ahead(path: str | Path, max_bytes: int = DECODE_AHEAD_MAX_BYTES) -> bool:
    """Decode one stored instance now, while the rest of its series arrives, and keep its stored
    values (``decoded``) for the volume stage; False when there is nothing to gain (not a
    compressed single-sample image) or it would decode to more than ``max_bytes``. Raises what
    reading or decoding raises."""
    with open(path, "rb") as f:
        source = os.fstat(f.fileno())  # the file as read: replaced later, the cache names another
        ds = pydicom.dcmread(f)
    if not (_is_image(ds) and _compressed(ds) and int(ds.get("SamplesPerPixel", 1)) == 1):
        return False
    if get_expected_length(ds, unit="bytes") > max_bytes:
        return False
    decoded.save(path, _pixel_array(ds, register_j2k()), source)
    return True


def _compressed(ds: pydicom.Dataset) -> bool:
    syntax = pydicom.uid.UID(_syntax(ds))
    return syntax.is_transfer_syntax and syntax.is_encapsulated


def _decoded_ahead(ds: pydicom.Dataset) -> np.ndarray | None:
    """What ``decode_ahead`` kept for this instance's file, if it fits its header."""
    if not ds.filename or not _compressed(ds):
        return None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    shape = (int(ds.Rows), int(ds.Columns)) if frames == 1 else (frames, int(ds.Rows), int(ds.Columns))
    pixels = decoded.load(ds.filename)
    return pixels if pixels is not None and pixels.shape == shape else None


def _pixel_array(ds: pydicom.Dataset, gil_free_j2k: bool) -> np.ndarray:
    """The stored values; JPEG 2000 through imagecodecs when it is there, pydicom's own plugins
    if it fails (they decode with the same OpenJPEG, holding the GIL)."""
    if gil_free_j2k and _syntax(ds) in J2K_SYNTAXES:
        ds.pixel_array_options(decoding_plugin=J2K_PLUGIN)
        try:
            return ds.pixel_array
        except Exception:  # noqa: BLE001 - whatever it was, pydicom's plugins get their turn
            ds.pixel_array_options(decoding_plugin="")
    return ds.pixel_array


def _syntax(ds: pydicom.Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "?")) if meta is not None else "?"
