"""The compute device of a worker process, chosen once: CUDA when present, else the CPU.

A worker loads its models once and keeps them, so the choice is made once per process and cached.
On the CPU the worker leaves one core to the DICOM listener; on a GPU, jobs take a per-device slot
(a lock file) so two large series never fight for the same GPU memory, even across workers.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
T = TypeVar("T")
R = TypeVar("R")


class DeviceError(ValueError):
    """A model asks for a device this machine does not have."""


@dataclass(frozen=True)
class Device:
    """Where a model runs: ``kind`` "cuda" or "cpu", the CUDA ``index``, CPU ``threads``."""

    kind: str
    index: int = 0
    threads: int = 1

    @property
    def torch_name(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"

    def autocast_dtype(self, precision: str = "auto") -> str | None:
        """The mixed-precision dtype name for ``precision`` ("auto": fp16 on CUDA, fp32 on CPU)."""
        if precision not in PRECISIONS:
            raise DeviceError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "auto":
            return "float16" if self.kind == "cuda" else None
        return {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}[precision]


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's cpuset, ``taskset``)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return usable or 1


def on_two_threads(step: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``step`` of every item, results in item order: on two threads where this process may use
    two cores (for steps whose numpy or scipy.ndimage loops release the GIL), in this thread
    otherwise. Not more than two: each step's memory is bounded, two at once hold twice that."""
    if len(items) < 2 or usable_cores() < 2:
        return [step(item) for item in items]
    with ThreadPoolExecutor(2, thread_name_prefix="two-threads") as threads:
        return list(threads.map(step, items))


def cpu_threads() -> int:
    """Threads for CPU inference: every core but one, which stays with the DICOM listener."""
    return max(1, usable_cores() - 1)


def cuda_available() -> bool:
    """True when torch is installed and sees a CUDA device (False without torch)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@functools.cache
def select_device(preference: str = "auto") -> Device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; once per process.

    Configures torch for the choice: cudnn benchmark on CUDA (and the cache emptied at exit), the
    thread count on CPU.
    """
    import torch

    if preference not in ("auto", "cpu") and not preference.startswith("cuda"):
        raise DeviceError(f"device must be auto, cpu, cuda or cuda:N, got {preference!r}")
    want_cuda = preference.startswith("cuda") or (preference == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise DeviceError(f"device {preference!r} requested but no CUDA device is available")
        index = int(preference.split(":", 1)[1]) if ":" in preference else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {preference!r}: only {torch.cuda.device_count()} CUDA devices")
        torch.backends.cudnn.benchmark = True
        atexit.register(release)
        return Device("cuda", index=index, threads=cpu_threads())
    threads = cpu_threads()
    torch.set_num_threads(threads)
    return Device("cpu", threads=threads)


def release() -> None:
    """Give cached GPU memory back (at worker exit, or after an out-of-memory error)."""
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_GPU_SLOTS = 1


def set_gpu_slots(slots: int) -> None:
    """How many jobs may use one GPU at the same time (default 1: one series at a time)."""
    global _GPU_SLOTS
    if slots < 1:
        raise DeviceError(f"GPU slots must be >= 1, got {slots}")
    _GPU_SLOTS = slots


def _lock_dir() -> Path:
    folder = Path(os.environ.get("VESALIUS_LOCK_DIR") or tempfile.gettempdir()) / "vesalius-gpu"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def device_slot(device: Device) -> Iterator[None]:
    """Hold one of the GPU's job slots while inside (no-op on the CPU).

    Slots are ``flock`` locks on files shared by every worker process of the machine, released by
    the kernel even when a worker dies, so a crashed job never leaves a GPU locked.
    """
    if device.kind != "cuda":
        yield
        return
    folder = _lock_dir()
    handles = [open(folder / f"cuda{device.index}-slot{i}.lock", "a+") for i in range(_GPU_SLOTS)]
    try:
        held = None
        while held is None:
            for handle in handles:  # a free slot right away ...
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = handle
                    break
                except BlockingIOError:
                    continue
            if held is None:  # ... or wait in line for the first one
                fcntl.flock(handles[0], fcntl.LOCK_EX)
                held = handles[0]
        yield
    finally:
        for handle in handles:
            handle.close()  # closing releases the lock
