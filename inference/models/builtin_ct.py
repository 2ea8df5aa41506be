"""A weight-free CT model: body, lungs, airways and bone from Hounsfield units and morphology.

Fast enough for any CPU (soft structures are found on a grid pooled to about 2 mm, bone at full
resolution) and independent of array orientation: anatomical directions (superior, patient left)
come from the affine, never from array indices.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from scipy import ndimage

from vesalius.inference.device import on_two_threads, usable_cores
from vesalius.inference.grid import pool
from vesalius.inference.models import Label, Model
from vesalius.inference.models.backend import Backend
from vesalius.inference.models.spec import ModelSpec
from vesalius.inference.models.structures import Structures
from vesalius.inference.volume import Volume

BODY, LUNG_LEFT, LUNG_RIGHT, AIRWAYS, BONE = 1, 2, 3, 4, 5

BODY_HU = -500.0  # patient (soft tissue, fat) vs. air, foam and most of the table mattress
AIR_HU = -400.0  # lung parenchyma and gas inside the body
AIRWAY_HU = (-950.0, -975.0, -990.0)  # pure air, tried from loosest until it stops leaking
BONE_LOW_HU = 150.0  # hysteresis: bone grows into this ...
BONE_CORE_HU = 300.0  # ... from voxels this dense
TRABECULAR_HU = 100.0  # marrow/trabecular bone enclosed in one plane denser than this is bone
BONE_CLOSING_MM = 3.0  # closes gaps in thin cortex before finding what it encloses
MARROW_HU = 60.0  # marrow enclosed in 3D and in its plane denser than this is bone (the spinal
# canal's cord and fluid, < 40 HU, are enclosed too once the arches are closed: only HU keeps them out)
MARROW_CLOSING_MM = 15.0  # seals leaky vertebral cortex (vessel foramina) in 3D ...
MARROW_PLANAR_CLOSING_MM = 18.0  # ... and within each slice (discs lie between, not inside)
POOL_MM = 3.0  # segmentation runs on a grid pooled to about this voxel size
REFINE_BLOCKS = 32768  # coarse edge blocks redrawn at full resolution at a time, per thread
LUNG_MEDIAN_HU = (-945.0, -600.0)  # lung parenchyma; gas (bowel, stomach) below, fat rims above
MIN_LUNG_ML = 5.0
MAX_AIRWAYS_ML = 250.0  # trachea + main bronchi; more means the growth leaked into the lungs
MAX_TRACHEA_CM2 = 8.0  # cross-section of the trachea (with margin) where it leaves the top slice
MAX_TRACHEA_OFF_MIDLINE_MM = 30.0
BONE_GROW_HU = 100.0  # full-resolution edge voxels of bone blocks at most this dense are not bone
BONE_EDGE_HU = 115.0  # next to bone, trabecular bone and partial-volume cortex ...
BONE_GROW_VOXELS = 1.5  # ... within this many (largest) voxel sizes, at least 3 mm, belong to it
VESSEL_P99_HU = 550.0  # thick components never this dense are contrast vessels / organs
VESSEL_MIN_THICKNESS_MM = 5.0
MIN_VESSEL_ML = 1.0  # smaller dense components are kept without the vessel test


class BuiltinCT:
    """Threshold-and-morphology CT segmentation with no weights."""

    name = "builtin_ct"
    version = "1"
    family = "morphology"
    structures: tuple[Label, ...] = (
        Label(BODY, "body", (LUNG_LEFT, LUNG_RIGHT, AIRWAYS, BONE)),
        Label(LUNG_LEFT, "lung_left"),
        Label(LUNG_RIGHT, "lung_right"),
        Label(AIRWAYS, "airways"),
        Label(BONE, "bone"),
    )

    def predict(self, volume: Volume) -> np.ndarray:
        """The label map: uint8, the volume's shape (values as in ``structures``)."""
        if volume.modality != "CT":  # its thresholds are Hounsfield units
            raise ValueError(f"builtin_ct segments CT only, this series is {volume.modality or 'unknown'}")
        hu = volume.array
        affine = volume.affine
        factors = _pool_factors(volume.spacing)
        coarse, peak = _together(lambda: pool(hu, factors, "mean"),
                                 lambda: pool(hu, factors, "max"))  # thin dense bone survives max
        scale = np.asarray(factors, float)
        coarse_affine = affine.copy()
        coarse_affine[:3, :3] = affine[:3, :3] * scale
        coarse_affine[:3, 3] = affine[:3, :3] @ ((scale - 1) / 2) + affine[:3, 3]
        coarse_spacing = volume.spacing * scale
        sup_axis = int(np.argmax(np.abs(affine[2, :3]) / volume.spacing))
        planar = _planar_structure(sup_axis)

        body = _body(coarse, planar)
        air = body & (coarse < AIR_HU)
        voxel_ml = abs(np.linalg.det(coarse_affine[:3, :3])) / 1000.0

        def airways_and_lungs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            airways = _airways(coarse, air, body, coarse_affine, sup_axis, voxel_ml)
            return (airways, *_lungs(coarse, air & ~airways, body, coarse_affine, planar, voxel_ml))

        bone, (airways, left, right) = _together(
            lambda: _bone(coarse, peak, body, coarse_spacing, planar), airways_and_lungs)

        label_map = np.zeros(coarse.shape, np.uint8)
        label_map[body] = BODY
        label_map[left] = LUNG_LEFT
        label_map[right] = LUNG_RIGHT
        label_map[airways] = AIRWAYS
        label_map[bone] = BONE
        if factors == (1, 1, 1):
            return label_map
        return _refine_edges(label_map, hu, body, left, right, bone, factors)


def _refine_edges(
    label_map: np.ndarray,
    hu: np.ndarray,
    body: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    bone: np.ndarray,
    factors: tuple[int, int, int],
) -> np.ndarray:
    """Redraw the edges of body, lungs and bone at full resolution.

    ``label_map`` is the coarse label map. Only the full-resolution blocks of coarse voxels on an
    edge are decided by their own HU, so the blocky edges of the pooled grid become smooth
    without redoing the morphology (and without touching the other ~95% of the voxels).
    """
    full = _unpool(label_map, factors, hu.shape)
    last = np.array(hu.shape) - 1
    # a block's voxel offsets along each axis, (f0, 1, 1), (1, f1, 1), (1, 1, f2): with the blocks'
    # indices as (blocks, 1, 1, 1) they broadcast to (blocks, f0, f1, f2)
    offsets = [np.arange(f).reshape([-1 if a == axis else 1 for a in range(3)])
               for axis, f in enumerate(factors)]

    def edge(mask: np.ndarray) -> np.ndarray:
        return ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask, border_value=1)

    # which blocks each rule redraws (morphology on the coarse masks, independent of each other)
    skin_at, pleura_at, near_left, cortex_at = _together(
        lambda: edge(body), lambda: edge(left | right), lambda: ndimage.binary_dilation(left),
        # only blocks on bone's outer edge: marrow that cortex encloses stays bone
        lambda: bone & ~ndimage.binary_erosion(bone, border_value=1))

    def refine(where: np.ndarray, rule) -> None:
        # a chunk of edge blocks at a time (each block is decided on its own); a block's voxels
        # past the volume's far edges are its edge voxels again (as edge padding would give: same
        # label, same HU, so the same decision), so neither the HU nor the labels are copied padded
        found = np.nonzero(where)

        def redraw(start: int) -> None:  # chunks hold distinct blocks: two threads redraw at once
            blocks_at = [index[start:start + REFINE_BLOCKS] for index in found]
            at = tuple(np.minimum(b.reshape(-1, 1, 1, 1) * f + offset, n)
                       for b, f, offset, n in zip(blocks_at, factors, offsets, last, strict=True))
            blocks = full[at]
            rule(blocks, hu[at], tuple(blocks_at))
            full[at] = blocks

        on_two_threads(redraw, range(0, len(found[0]), REFINE_BLOCKS))

    def skin(blocks: np.ndarray, h: np.ndarray, _) -> None:
        blocks[(blocks == BODY) & (h <= BODY_HU)] = 0
        blocks[(blocks == 0) & (h > BODY_HU)] = BODY

    refine(skin_at, skin)

    def pleura(blocks: np.ndarray, h: np.ndarray, index) -> None:
        lung = (blocks == LUNG_LEFT) | (blocks == LUNG_RIGHT)
        blocks[lung & (h >= AIR_HU)] = BODY
        side = np.where(near_left[index], LUNG_LEFT, LUNG_RIGHT).astype(np.uint8)
        grow = (blocks == BODY) & (h < AIR_HU)
        blocks[grow] = np.broadcast_to(side[:, None, None, None], blocks.shape)[grow]

    if left.any() or right.any():
        refine(pleura_at, pleura)

    def cortex(blocks: np.ndarray, h: np.ndarray, _) -> None:
        blocks[(blocks == BONE) & (h <= BONE_GROW_HU)] = BODY

    refine(cortex_at, cortex)
    return full


def _together(*steps: Callable[[], Any]) -> list[Any]:
    """The results of independent steps, run at once (the first in this thread) when this
    process may use more than one core: scipy.ndimage and numpy release the GIL in their loops,
    so the steps overlap on the core the model stage would otherwise leave idle."""
    if len(steps) == 1 or usable_cores() < 2:
        return [step() for step in steps]
    with ThreadPoolExecutor(len(steps) - 1, thread_name_prefix="builtin-ct") as threads:
        rest = [threads.submit(step) for step in steps[1:]]
        return [steps[0](), *(future.result() for future in rest)]


def _pool_factors(spacing: np.ndarray) -> tuple[int, int, int]:
    return tuple(max(1, int(POOL_MM / s + 1e-6)) for s in spacing)  # type: ignore[return-value]


def _unpool(label_map: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Each coarse voxel repeated over its block, the last block of each axis only as far as
    ``shape`` reaches (no padded copy to crop)."""
    for axis, f in enumerate(factors):
        if f > 1:
            counts = np.full(label_map.shape[axis], f)
            counts[-1] = shape[axis] - f * (label_map.shape[axis] - 1)
            label_map = np.repeat(label_map, counts, axis=axis)
    return label_map


def _planar_structure(axis: int) -> np.ndarray:
    """4-connectivity within the planes perpendicular to ``axis`` (per-slice operations)."""
    structure = ndimage.generate_binary_structure(3, 1)
    index: list[slice | int] = [slice(None)] * 3
    for end in (0, 2):
        index[axis] = end
        structure[tuple(index)] = False
    return structure


def _morphology(operation, mask: np.ndarray, iterations: int) -> np.ndarray:
    """Opening/closing with the volume edge replicated, so structures cut by it are kept."""
    padded = np.pad(mask, iterations, mode="edge")
    inner = (slice(iterations, -iterations),) * 3
    return operation(padded, iterations=iterations)[inner]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def _body(coarse: np.ndarray, planar: np.ndarray) -> np.ndarray:
    """The patient: the largest dense component (an opening cuts thin links to the table)."""
    dense = coarse > BODY_HU
    core = _largest_component(_morphology(ndimage.binary_opening, dense, 2))
    body = ndimage.binary_dilation(core, iterations=2) & dense
    body = _largest_component(body)
    body = ndimage.binary_fill_holes(body, structure=planar)
    return ndimage.binary_fill_holes(body)


def _airways(
    coarse: np.ndarray,
    air: np.ndarray,
    body: np.ndarray,
    affine: np.ndarray,
    sup_axis: int,
    voxel_ml: float,
) -> np.ndarray:
    """Trachea and main bronchi: pure air grown down from the top of the volume inside the body."""
    top: list[slice | int] = [slice(None)] * 3
    top[sup_axis] = -1 if affine[2, sup_axis] > 0 else 0
    top_air = air[tuple(top)]
    pixel_cm2 = voxel_ml * 10.0 / float(np.linalg.norm(affine[:3, sup_axis]))
    # the trachea crosses the top slice as a small island of air; lungs there are large
    islands, count = ndimage.label(top_air)
    areas = np.bincount(islands.ravel(), minlength=count + 1) * pixel_cm2
    x = _x_coordinate(affine, coarse.shape)[tuple(top)]
    x = np.broadcast_to(x, top_air.shape)
    midline = float(np.mean(x[body[tuple(top)]])) if body[tuple(top)].any() else 0.0
    index = np.arange(1, count + 1)
    centres = np.asarray(ndimage.mean(x, islands, index)) if count else np.zeros(0)
    small = index[
        (areas[1:] >= 0.3)
        & (areas[1:] <= MAX_TRACHEA_CM2)
        & (np.abs(centres - midline) <= MAX_TRACHEA_OFF_MIDLINE_MM)
    ]
    trachea = np.isin(islands, small)
    empty = np.zeros(coarse.shape, bool)
    if not trachea.any():
        return empty
    for threshold in AIRWAY_HU:
        candidate = air & (coarse < threshold)
        components, count = ndimage.label(candidate)
        seeds = np.unique(components[tuple(top)][trachea])
        seeds = seeds[seeds > 0]
        if seeds.size == 0:
            continue
        tree = np.isin(components, seeds)
        if tree.sum() * voxel_ml <= MAX_AIRWAYS_ML:
            return tree
    return empty


def _lungs(
    coarse: np.ndarray,
    air: np.ndarray,
    body: np.ndarray,
    affine: np.ndarray,
    planar: np.ndarray,
    voxel_ml: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Left and right lung: large air components of parenchymal density, split at the midline."""
    components, count = ndimage.label(air)
    left = np.zeros(coarse.shape, bool)
    right = np.zeros(coarse.shape, bool)
    if count == 0:
        return left, right
    sizes = np.bincount(components.ravel(), minlength=count + 1) * voxel_ml
    objects = ndimage.find_objects(components)
    keep = []
    for value in np.flatnonzero(sizes >= MIN_LUNG_ML):
        if value == 0:
            continue
        box = objects[value - 1]
        median = float(np.median(coarse[box][components[box] == value]))
        if LUNG_MEDIAN_HU[0] < median < LUNG_MEDIAN_HU[1]:
            keep.append(value)
    if not keep:
        return left, right
    lungs = np.isin(components, keep)
    # vessels and nodules inside the lungs belong to them
    lungs = _morphology(ndimage.binary_closing, lungs, 2) & body
    lungs = ndimage.binary_fill_holes(lungs, structure=planar)
    # patient left is +x in LPS: split at the body's mid-sagittal plane
    x = _x_coordinate(affine, coarse.shape)
    midline = float(np.mean(x[body])) if body.any() else 0.0
    components, count = ndimage.label(lungs)
    for number in range(1, count + 1):
        part = components == number
        share_left = float(np.mean(x[part] > midline))
        if share_left > 0.8:
            left |= part
        elif share_left < 0.2:
            right |= part
        else:  # one component across the midline (joined lungs): cut it there
            left |= part & (x > midline)
            right |= part & (x <= midline)
    return left, right


def _x_coordinate(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """LPS x (towards patient left) of every voxel centre, broadcast over the grid."""
    grids = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return affine[0, 3] + sum(affine[0, axis] * grids[axis] for axis in range(3))


def _bone(
    coarse: np.ndarray, peak: np.ndarray, body: np.ndarray, spacing: np.ndarray, planar: np.ndarray
) -> np.ndarray:
    """Dense components grown from cortical cores, minus thick homogeneous (vessel) blobs.

    ``coarse`` is the mean and ``peak`` the maximum HU of each pooled voxel.
    """
    low = (peak > BONE_LOW_HU) & body
    components, count = ndimage.label(low)
    cored = np.unique(components[(peak > BONE_CORE_HU) & low])
    cored = cored[cored > 0]
    if cored.size == 0:
        return np.zeros(coarse.shape, bool)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    objects = ndimage.find_objects(components)
    keep = [value for value in cored if not (
        sizes[value] * voxel_ml >= MIN_VESSEL_ML
        and _looks_like_vessel(components[objects[value - 1]] == value,
                               peak[objects[value - 1]], coarse[objects[value - 1]], spacing)
    )]
    bone = np.isin(components, keep)
    if not bone.any():
        return bone
    # an enhanced vessel touching bone joins its component: remove its thick part, and keep the
    # marrow and edge growth below out of it
    vessel = ndimage.binary_dilation(_thick_vessel_parts(bone, peak, spacing))
    bone &= ~vessel
    box = _bounding_box(bone, round(MARROW_PLANAR_CLOSING_MM / float(spacing.min())) + 2)
    bone[box] |= _marrow(bone[box], coarse[box], spacing, planar) & ~vessel[box]
    reach = max(3.0, BONE_GROW_VOXELS * float(spacing.max()))
    near = ndimage.distance_transform_edt(~bone[box], sampling=spacing) <= reach
    bone[box] |= near & (coarse[box] > BONE_EDGE_HU) & body[box] & ~vessel[box]
    return bone


def _fill_holes(mask: np.ndarray, structure: np.ndarray | None) -> np.ndarray:
    """``ndimage.binary_fill_holes`` by labelling the background once (it dilates step by step).

    The outside reaches in through the faces of the axes the structure connects along.
    """
    background, _ = ndimage.label(~mask, structure)
    axes = [a for a in range(3) if structure is None or np.take(structure, 0, axis=a).any()]
    faces = [background.take(end, axis) for axis in axes for end in (0, -1)]
    outside = np.unique(np.concatenate([face.ravel() for face in faces]))
    return np.asarray(mask | ((background > 0) & ~np.isin(background, outside)), bool)


def _thick_vessel_parts(bone: np.ndarray, peak: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Thick parts never as dense as cortex inside bone components: enhanced vessels touching bone."""
    box = _bounding_box(bone, 1)
    steps = max(1, round(VESSEL_MIN_THICKNESS_MM / float(spacing.min())))
    opened = ndimage.binary_opening(bone[box], iterations=steps)
    parts, count = ndimage.label(opened)
    vessel = np.zeros(bone.shape, bool)
    if count == 0:
        return vessel
    index = np.arange(1, count + 1)
    p99 = ndimage.labeled_comprehension(peak[box], parts, index,
                                        lambda v: np.percentile(v, 99), float, 0.0)
    vessel[box] = np.isin(parts, index[p99 < VESSEL_P99_HU])
    return vessel


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The slices around ``mask``'s voxels, widened by ``margin`` (for cheap morphology)."""
    nonzero = np.nonzero(mask)
    return tuple(
        slice(max(0, int(i.min()) - margin), min(n, int(i.max()) + margin + 1))
        for i, n in zip(nonzero, mask.shape, strict=True)
    )


def _marrow(bone: np.ndarray, coarse: np.ndarray, spacing: np.ndarray, planar: np.ndarray) -> np.ndarray:
    """Marrow and trabecular bone that cortex encloses, not the spinal canal or the discs.

    Dense marrow (> TRABECULAR_HU) counts when a slightly closed cortex rings it in its plane.
    Less dense marrow (> MARROW_HU, above cord and fluid) must be sealed in 3D by a strongly
    closed cortex, and ringed within its own slice, which discs between vertebrae are not.
    """
    def closed(millimetres: float, structure: np.ndarray | None) -> np.ndarray:
        steps = max(1, round(millimetres / float(spacing.min())))
        padded = np.pad(bone, steps, mode="edge")  # structures cut by the volume edge stay open
        inner = (slice(steps, -steps),) * 3
        return ndimage.binary_closing(padded, structure, iterations=steps)[inner]

    ringed, sealed, sealed_planar = _together(
        lambda: _fill_holes(closed(BONE_CLOSING_MM, None), planar),
        lambda: _fill_holes(closed(MARROW_CLOSING_MM, None), None),
        lambda: _fill_holes(closed(MARROW_PLANAR_CLOSING_MM, planar), planar))
    dense = ringed & (coarse > TRABECULAR_HU)
    sealed &= sealed_planar
    return np.asarray((dense | (sealed & (coarse > MARROW_HU))) & ~bone, bool)


def _looks_like_vessel(
    mask: np.ndarray, peak: np.ndarray, coarse: np.ndarray, spacing: np.ndarray
) -> bool:
    """Thick and never as dense as cortex: contrast-filled vessels, enhancing kidneys.

    Thickness is measured on the mean HU: max pooling of fine pixels widens a thin rib by a voxel.
    """
    if np.percentile(peak[mask], 99) >= VESSEL_P99_HU:
        return False
    return _max_inscribed_radius_mm(mask & (coarse > BONE_LOW_HU), spacing) >= VESSEL_MIN_THICKNESS_MM


def _max_inscribed_radius_mm(mask: np.ndarray, spacing: np.ndarray) -> float:
    """Largest distance from inside a mask to its edge (thin rib vs. thick vessel)."""
    return float(ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing).max())


class BuiltinBackend(Backend):
    """``builtin_ct``: no weights, always on the CPU."""

    kind = "builtin"

    def weight_problems(self, spec: ModelSpec) -> list[str]:
        return []

    def structures(self, spec: ModelSpec) -> Structures:
        return BuiltinCT.structures, {label.value: label.value for label in BuiltinCT.structures}

    def load(self, spec: ModelSpec) -> Model:
        return BuiltinCT()

    def device(self, spec: ModelSpec) -> str:
        return "cpu"


backend = BuiltinBackend()
