"""Every model kind, listed once: kind -> the module whose ``backend`` builds it.

A new kind is one module with a ``Backend`` subclass instance named ``backend`` and one row here.
The modules are imported on first use (``backend.backend_for``), so listing a kind costs nothing
until a model of that kind is named; none of them imports torch until a network runs.
"""

from __future__ import annotations

BUILTIN = "builtin_ct"  # the one model that needs no configuration

BACKEND_MODULES: dict[str, str] = {
    "builtin": "vesalius.inference.models.builtin_ct",
    "bundle": "vesalius.inference.models.monai_bundle",
    "torchscript": "vesalius.inference.models.torchscript",
    "onnx": "vesalius.inference.models.onnx_model",
    "nnunet": "vesalius.inference.models.nnunet",
    "totalsegmentator": "vesalius.inference.models.totalsegmentator",
}
MERGE = "merge"  # not a backend: several models painted into one label map
CONFIG_KINDS = (*(k for k in BACKEND_MODULES if k != "builtin"), MERGE)  # what [[models]] may say
PATH_FORMS = tuple(k for k in BACKEND_MODULES if k != "builtin")  # kind:PATH references
