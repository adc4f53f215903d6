"""Minibatches gathered on the accelerator: the whole CSR matrix lives in device memory.

When the counts fit on the GPU, copying each densified minibatch from the host every step is
the bottleneck of a small model. :class:`DeviceCountBatches` uploads ``indptr``, ``indices`` and
``data`` once and builds every dense minibatch on the device with a vectorised CSR row gather
(:func:`gather_csr_rows`), so a training step moves only the minibatch's row indices to the
device. The same code runs on CPU (tests; ``device="cpu"``).

:func:`resolve_data_on_device` decides ``"auto"``: on a GPU, when the matrix fits in a share of
the memory this process may use (the device's free memory, or a fractional-GPU trial's cap);
never for memory-mapped data.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from regvi.data.loader import CountBatches, MultiCountBatches

#: ``data_on_device="auto"`` uses at most this share of the process's device budget for the counts
DEVICE_MEMORY_SHARE = 0.5


class DeviceCSR:
    """A CSR matrix as three device tensors, with a dense row gather.

    Parameters
    ----------
    X
        Counts, CSR (or dense, converted), cells × features.
    device
        Target device, e.g. ``"cuda"`` or ``"cpu"``.
    """

    def __init__(self, X: Any, device: str | torch.device):
        csr = X if sp.isspmatrix_csr(X) or isinstance(X, sp.csr_array) else sp.csr_matrix(X)
        self.shape = tuple(int(s) for s in csr.shape)
        self.device = torch.device(device)
        # host copy of the row pointers: a batch's entry count is known without a device sync
        self.host_indptr = np.asarray(csr.indptr, dtype=np.int64)
        self.indptr = torch.as_tensor(self.host_indptr, device=self.device)
        # column indices fit int32 (n_features < 2**31): 8 device bytes per non-zero, not 12
        self.indices = torch.as_tensor(np.asarray(csr.indices, dtype=np.int32), device=self.device)
        self.data = torch.as_tensor(np.asarray(csr.data, dtype=np.float32), device=self.device)

    @property
    def nbytes(self) -> int:
        """Device bytes held by the three arrays."""
        return sum(t.numel() * t.element_size() for t in (self.indptr, self.indices, self.data))

    def n_entries(self, idx: np.ndarray) -> int:
        """Stored entries of rows ``idx`` (host arithmetic: no wait for the device)."""
        idx = np.asarray(idx, dtype=np.int64)
        return int((self.host_indptr[idx + 1] - self.host_indptr[idx]).sum())

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dense float32 rows ``X[idx]`` (in the order of ``idx``), built on the device."""
        return gather_csr_rows(self.indptr, self.indices, self.data, idx, self.shape[1])[0]

    def rows_with_entries(
        self, idx: torch.Tensor, total: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense rows plus their stored entries (flat positions, values); see gather_csr_rows."""
        return gather_csr_rows(self.indptr, self.indices, self.data, idx, self.shape[1], total)


def gather_csr_rows(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    data: torch.Tensor,
    idx: torch.Tensor,
    n_cols: int,
    total: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense ``(len(idx), n_cols)`` rows of a CSR matrix, vectorised (no Python loop).

    Row ``i`` of the result is matrix row ``idx[i]``: for every stored entry of the selected
    rows, its source position is ``indptr[idx[i]] + k`` and its destination ``i · n_cols +
    indices[...]``; one scatter writes them all. ``total``, the number of stored entries of
    the selected rows, sizes the outputs; given (from host row pointers), the gather runs
    without waiting for the device, otherwise it is read back from the device.

    Returns
    -------
    tuple
        The dense rows, the flat destinations of the stored entries (int64) and their values.
    """
    starts = indptr.index_select(0, idx)
    lengths = indptr.index_select(0, idx + 1) - starts
    out = torch.zeros(len(idx) * n_cols, dtype=data.dtype, device=data.device)
    if total is None:
        total = int(lengths.sum())  # a device → host sync
    if total == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=data.device)
        return out.view(len(idx), n_cols), empty, data[:0]
    row = torch.repeat_interleave(
        torch.arange(len(idx), device=idx.device), lengths, output_size=total
    )
    # position of each entry within its row: global rank minus the row's first rank
    first = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(total, device=idx.device) - first.index_select(0, row)
    src = starts.index_select(0, row) + within
    dest = row * n_cols + indices.index_select(0, src)
    values = data.index_select(0, src)
    out.index_copy_(0, dest, values)
    return out.view(len(idx), n_cols), dest, values


class DeviceCountBatches(CountBatches):
    """:class:`~regvi.data.loader.CountBatches` with counts and covariates on ``device``.

    ``__getitem__`` takes the minibatch's row indices (numpy or tensor) and returns the same
    dict as the host version, every tensor already on the device.
    """

    def __init__(self, host: CountBatches, device: str | torch.device):
        self.device = torch.device(device)
        self.csr = DeviceCSR(host.X, self.device)
        self.X = host.X
        self.sparse = True
        self.covariates = {k: v.to(self.device) for k, v in host.covariates.items()}

    def __len__(self) -> int:
        return self.csr.shape[0]

    def __getitem__(self, idx: Any) -> dict[str, torch.Tensor]:
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        hidx = np.ascontiguousarray(idx, dtype=np.int64)
        tidx = torch.from_numpy(hidx).to(self.device, non_blocking=True)
        x, flat, values = self.csr.rows_with_entries(tidx, self.csr.n_entries(hidx))
        batch = {"x": x, "index": tidx, "x_nonzero": flat, "x_values": values}
        for k, v in self.covariates.items():
            batch[k] = v.index_select(0, tidx)
        return batch


def to_device(
    data: CountBatches | MultiCountBatches, device: str | torch.device
) -> DeviceCountBatches | MultiCountBatches:
    """The device-resident version of a host minibatch view (single or multi-modal)."""
    if isinstance(data, MultiCountBatches):
        moved = copy.copy(data)
        moved.parts = {m: DeviceCountBatches(p, device) for m, p in data.parts.items()}
        moved.covariates = {k: v.to(device) for k, v in data.covariates.items()}
        moved.observed = {m: v.to(device) for m, v in data.observed.items()}
        moved.device = torch.device(device)
        return moved
    return DeviceCountBatches(data, device)


def device_bytes_needed(data: CountBatches | MultiCountBatches) -> int:
    """Bytes :func:`to_device` would allocate (int64 indptr, int32 indices, float32 values)."""
    parts = data.parts.values() if isinstance(data, MultiCountBatches) else [data]
    total = 0
    for p in parts:
        X = p.X
        nnz = X.nnz if sp.issparse(X) else int(np.count_nonzero(X))
        total += 8 * (X.shape[0] + 1) + 8 * nnz
        total += sum(v.numel() * v.element_size() for v in p.covariates.values())
    return total


def resolve_data_on_device(
    setting: bool | str,
    data: CountBatches | MultiCountBatches,
    device: torch.device,
    memory_mapped: bool = False,
) -> bool:
    """Decide whether to keep the counts on ``device``.

    Parameters
    ----------
    setting
        ``True``, ``False`` or ``"auto"`` (on a CUDA device when the counts take at most
        :data:`DEVICE_MEMORY_SHARE` of what this process may allocate there,
        :func:`device_memory_budget`; never for memory-mapped data).
    data
        The host minibatch view.
    device
        The training device.
    memory_mapped
        The counts are memory-mapped (out-of-core): ``"auto"`` keeps them on the host.
    """
    if setting not in (True, False, "auto"):
        raise ValueError(f"data_on_device={setting!r}; expected True, False or 'auto'")
    if setting != "auto":
        return bool(setting)
    if device.type != "cuda" or memory_mapped:
        return False
    return device_bytes_needed(data) <= DEVICE_MEMORY_SHARE * device_memory_budget(device)


#: the per-process caps set by :func:`limit_gpu_memory`, by device index
_GPU_FRACTION: dict[int, float] = {}


def _cuda_index(device: torch.device) -> int:
    """``device``'s CUDA index (``cuda`` alone means the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def device_memory_budget(device: torch.device) -> int:
    """Bytes this process may still allocate on CUDA ``device``: the device's free memory, or
    less under this process's cap (:func:`limit_gpu_memory`, a fractional-GPU trial's share)
    minus what its caching allocator already holds."""
    free, total = torch.cuda.mem_get_info(device)
    fraction = _GPU_FRACTION.get(_cuda_index(device))
    if fraction is None:
        return int(free)
    capped = int(fraction * total) - torch.cuda.memory_reserved(device)
    return max(0, min(int(free), capped))


#: Lightning precision settings regvi supports (``"32"`` / ``"bf16"`` / ``"16"`` are aliases)
PRECISIONS = {
    "32": "32-true",
    "32-true": "32-true",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
    "16": "16-mixed",
    "16-mixed": "16-mixed",
}


def training_device(accelerator: str) -> torch.device:
    """The torch device a ``lightning.Trainer(accelerator=...)`` process trains on.

    ``"gpu"`` / ``"cuda"`` (the current CUDA device, as set by Ray Train for its worker),
    ``"auto"`` (CUDA when visible) or ``"cpu"``; other accelerators count as host devices here
    (minibatches are built on the host).
    """
    acc = str(accelerator).lower()
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError(f"accelerator={accelerator!r}, but no CUDA device is visible")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_precision(precision: Any, device: torch.device) -> str:
    """Normalise ``precision`` to a Lightning setting; ``16-mixed`` needs a GPU."""
    key = str(precision)
    if key not in PRECISIONS:
        raise ValueError(
            f"precision={precision!r}; expected one of {sorted(set(PRECISIONS.values()))}"
        )
    value = PRECISIONS[key]
    if value == "16-mixed" and device.type != "cuda":
        raise ValueError("precision='16-mixed' needs a CUDA device; on CPU use 'bf16-mixed'")
    return value


def dataset_is_memory_mapped(data: CountBatches | MultiCountBatches) -> bool:
    """Whether any modality's counts are memory-mapped (out-of-core)."""
    from regvi.data.mmap import is_mmap_backed

    parts = data.parts.values() if isinstance(data, MultiCountBatches) else [data]
    return any(is_mmap_backed(p.X) for p in parts)


def limit_gpu_memory(fraction: float, device: torch.device | None = None) -> float | None:
    """Cap this process's CUDA caching allocator at ``fraction`` of the device's memory.

    Trials that share one GPU (fractional ``gpus_per_worker``) each get their share, so one
    trial's cache cannot starve the others: a trial that needs more fails itself with a CUDA
    out-of-memory error instead of its neighbours. Returns the fraction set, or ``None`` when
    no CUDA device is visible or ``fraction`` ≥ 1 (nothing to cap).
    """
    if not 0.0 < fraction:
        raise ValueError(f"fraction={fraction}; expected a positive number")
    if fraction >= 1.0 or not torch.cuda.is_available():
        return None
    dev = device if device is not None else torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_per_process_memory_fraction(fraction, dev)
    _GPU_FRACTION[_cuda_index(dev)] = fraction
    return fraction
