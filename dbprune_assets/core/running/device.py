"""Which device and how many CPU threads: the one place that decides.

``compute.device`` is ``auto`` (CUDA when torch or faiss sees a GPU, else the
CPU), ``cpu`` or ``cuda``/``cuda:N``.  torch and faiss make the choice
independently (faiss-gpu can see a GPU that a CPU-only torch cannot), so there
is one function for each, both reading the same setting, and
:func:`kmeans_backend` for k-means and nearest-centroid search: faiss on its
GPU when it sees one, else torch on CUDA when torch sees it (faiss-gpu's wheel
is built for CUDA 12), else faiss on the CPU.  Threads: an explicit
``compute.threads``, else the cores this process may use minus the busy decode
workers beside it (more OpenMP threads than free cores spin against the
decoders; measured 3-4x slower on 2 cores).

torch and faiss are imported inside the functions: the Dagster code location
imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, ContextManager, Iterator


class DeviceError(RuntimeError):
    """``compute.device`` asks for a device this machine does not have."""


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def auto_threads(workers: int = 0, cores: int | None = None, processes: int = 1) -> int:
    """Compute threads per process beside ``workers`` busy decode processes
    each: the remaining cores (of ``cores``, default :func:`available_cores`)
    shared by ``processes`` compute processes (torchrun ranks), at least 1."""
    processes = max(1, processes)
    free = (cores if cores is not None else available_cores()) - max(0, workers) * processes
    return max(1, free // processes)


def torch_device(device: str | None = "auto") -> str:
    """The torch device for a ``compute.device`` value: ``auto`` → ``cuda``
    when available, else ``cpu``; ``cuda`` without CUDA is a :class:`DeviceError`."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("compute.device is 'cuda' but no CUDA device is available; "
                          "set compute.device: auto or cpu")
    return device


def cuda_device_count() -> int:
    """CUDA devices torch can see (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def faiss_gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def faiss_use_gpu(device: str | bool | None = "auto") -> bool:
    """Whether faiss runs on the GPU for a ``compute.device`` value (or an
    explicit bool; None means auto).  ``cuda`` without a GPU faiss can use is a
    :class:`DeviceError`.  k-means and nearest-centroid search take
    :func:`kmeans_backend` instead, which falls back to torch on CUDA."""
    if device is None or device == "auto":
        return faiss_gpu_count() > 0
    want = device if isinstance(device, bool) else str(device).lower().startswith("cuda")
    if want and faiss_gpu_count() == 0:
        raise DeviceError("compute.device asks for the GPU but faiss sees none; set compute.device: auto or cpu")
    return bool(want)


@dataclasses.dataclass(frozen=True)
class KmeansBackend:
    """Where k-means and nearest-centroid search run: ``library`` ``faiss``
    (``gpu``: on faiss' GPU) or ``torch`` on the torch ``device``."""

    library: str = "faiss"
    gpu: bool = False
    device: str = "cpu"

    @property
    def name(self) -> str:
        if self.library == "faiss":
            return "faiss-gpu" if self.gpu else "faiss-cpu"
        return f"torch-{self.device}"


FAISS_CPU = KmeansBackend("faiss", False, "cpu")
FAISS_GPU = KmeansBackend("faiss", True, "cuda")


def torch_backend(device: str = "cuda") -> KmeansBackend:
    """torch on ``device`` (``cpu`` stands in for CUDA in tests and benchmarks)."""
    return KmeansBackend("torch", str(device).startswith("cuda"), str(device))


def _torch_cuda() -> bool:
    import glob
    import sys

    if sys.platform.startswith("linux") and not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists(
            "/proc/driver/nvidia"):
        return False  # no NVIDIA device on this machine: spare the import of torch (seconds)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return torch.cuda.is_available()


def kmeans_backend(device: "str | bool | KmeansBackend | None" = "auto") -> KmeansBackend:
    """The k-means backend for a ``compute.device`` value (or an explicit bool:
    False = the CPU, True = a GPU; None = auto; a :class:`KmeansBackend` is
    returned as is).

    * ``cpu`` / False: faiss on the CPU;
    * ``auto`` / None: faiss' GPU when faiss sees one, else torch on ``cuda``
      when torch sees CUDA, else faiss on the CPU;
    * ``cuda``, ``cuda:N`` / True: the same GPU order; no GPU is a :class:`DeviceError`.
    """
    if isinstance(device, KmeansBackend):
        return device
    if device is False or str(device).lower() == "cpu":
        return FAISS_CPU
    auto = device is None or str(device).lower() == "auto"
    if faiss_gpu_count() > 0:
        return FAISS_GPU
    if _torch_cuda():
        return torch_backend("cuda" if auto or device is True else str(device).lower())
    if auto:
        return FAISS_CPU
    raise DeviceError("compute.device asks for the GPU but neither faiss nor torch sees one; "
                      "set compute.device: auto or cpu")


@contextlib.contextmanager
def _scoped_threads(get: Callable[[], int], set_: Callable[[int], None], threads: int) -> Iterator[None]:
    """Set a library's thread count with ``set_`` for the block (0 = leave as is)."""
    if threads <= 0:
        yield
        return
    before = get()
    set_(int(threads))
    try:
        yield
    finally:
        set_(before)


def torch_threads(threads: int) -> ContextManager[None]:
    """Set torch's intra-op threads for the block (0 = leave as is)."""
    import torch

    return _scoped_threads(torch.get_num_threads, torch.set_num_threads, threads)


def faiss_threads(threads: int) -> ContextManager[None]:
    """Set faiss' OpenMP threads for the block (0 = leave the library default)."""
    import faiss

    return _scoped_threads(faiss.omp_get_max_threads, faiss.omp_set_num_threads, threads)


@contextlib.contextmanager
def highest_matmul_precision() -> Iterator[None]:
    """No TF32 / bf16 shortcuts for float32 matmuls inside the block (the
    float32 error bounds of SemDeDup's filter and of k-means' label rule
    assume IEEE float32 products)."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
