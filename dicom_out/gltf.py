"""Every structure's mesh -> one binary glTF (.glb) with colours, for AR/VR and web 3D viewers.

glTF is Y-up and in metres; our meshes are in patient LPS millimetres. The vertex data stay
exactly the meshes' LPS millimetres (so the file can be checked against the DICOM surfaces), and
one root node carries the transform to glTF's frame: x = patient left, y = superior (up),
z = anterior (the model faces the viewer), times 0.001. That transform is a rotation (determinant
+1), so triangle winding and outward normals are kept. One node and one material per structure,
named after it; colours are the table's (sRGB converted to glTF's linear base colour), and the
table's opacity below 1 (the body) becomes alpha blending.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pygltflib

from vesalius.inference.surfaces import Mesh
from vesalius.inference.terminology import term_for

# LPS millimetres -> glTF (x left, y superior, z anterior) metres; glTF matrices are column-major
LPS_MM_TO_GLTF = np.array([
    [0.001, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.001, 0.0],
    [0.0, -0.001, 0.0, 0.0],
    [0.0, 0.0, 0.0, 1.0],
])
ROOT_NODE_NAME = "patient LPS mm"


def _linear(channel: int) -> float:
    """sRGB 0..255 -> linear 0..1 (glTF base colours are linear)."""
    c = channel / 255.0
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def _add_view(blob: bytearray, views: list[pygltflib.BufferView], data: np.ndarray, target: int) -> int:
    while len(blob) % 4:  # accessors must be aligned to their component size
        blob.append(0)
    views.append(pygltflib.BufferView(buffer=0, byteOffset=len(blob), byteLength=data.nbytes,
                                      target=target))
    blob.extend(data.tobytes())
    return len(views) - 1


def glb_bytes(meshes: Sequence[Mesh]) -> bytes:
    """All ``meshes`` in one binary glTF 2.0 document."""
    if not meshes:
        raise ValueError("no mesh to write as glTF")
    blob = bytearray()
    views: list[pygltflib.BufferView] = []
    accessors: list[pygltflib.Accessor] = []
    gltf_meshes, materials, nodes = [], [], []
    for index, mesh in enumerate(meshes):
        if len(mesh.triangles) == 0:
            raise ValueError(f"{mesh.label.name}: an empty mesh cannot be written as glTF")
        term = term_for(mesh.label.name)
        points = np.ascontiguousarray(mesh.points, dtype="<f4")
        normals = np.ascontiguousarray(mesh.normals, dtype="<f4")
        indices = np.ascontiguousarray(mesh.triangles, dtype="<u4").ravel()
        first = len(accessors)
        accessors.append(pygltflib.Accessor(
            bufferView=_add_view(blob, views, points, pygltflib.ARRAY_BUFFER),
            componentType=pygltflib.FLOAT, count=len(points), type=pygltflib.VEC3,
            min=points.min(axis=0).tolist(), max=points.max(axis=0).tolist()))
        accessors.append(pygltflib.Accessor(
            bufferView=_add_view(blob, views, normals, pygltflib.ARRAY_BUFFER),
            componentType=pygltflib.FLOAT, count=len(normals), type=pygltflib.VEC3))
        accessors.append(pygltflib.Accessor(
            bufferView=_add_view(blob, views, indices, pygltflib.ELEMENT_ARRAY_BUFFER),
            componentType=pygltflib.UNSIGNED_INT, count=len(indices), type=pygltflib.SCALAR))
        materials.append(pygltflib.Material(
            name=term.label,
            pbrMetallicRoughness=pygltflib.PbrMetallicRoughness(
                baseColorFactor=[*(_linear(c) for c in term.rgb), float(term.opacity)],
                metallicFactor=0.0, roughnessFactor=0.6),
            alphaMode=pygltflib.BLEND if term.opacity < 1.0 else pygltflib.OPAQUE,
            doubleSided=False))
        gltf_meshes.append(pygltflib.Mesh(name=term.label, primitives=[pygltflib.Primitive(
            attributes=pygltflib.Attributes(POSITION=first, NORMAL=first + 1),
            indices=first + 2, material=index, mode=pygltflib.TRIANGLES)]))
        nodes.append(pygltflib.Node(name=mesh.label.name, mesh=index,
                                    extras={"label": term.label}))
    nodes.append(pygltflib.Node(name=ROOT_NODE_NAME, children=list(range(len(meshes))),
                                matrix=LPS_MM_TO_GLTF.T.ravel().tolist()))
    document = pygltflib.GLTF2(
        asset=pygltflib.Asset(generator="Vesalius", version="2.0"),
        scene=0,
        scenes=[pygltflib.Scene(nodes=[len(nodes) - 1])],
        nodes=nodes,
        meshes=gltf_meshes,
        materials=materials,
        accessors=accessors,
        bufferViews=views,
        buffers=[pygltflib.Buffer(byteLength=len(blob))],
    )
    document.set_binary_blob(bytes(blob))
    return b"".join(document.save_to_bytes())


def write_glb(meshes: Sequence[Mesh], path: Path) -> Path:
    """Write all ``meshes`` as one .glb at ``path`` (parent folders created); returns the path."""
    data = glb_bytes(meshes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
