"""What a CUDA run needs beyond its allocated peak, term by term, and how much the local GPU has free.

The phases predict the caching allocator's *allocated* peak (what ``max_memory_allocated`` reports, and what the
probe's categories add up to). A run dies when a ``cudaMalloc`` fails, i.e. when the allocator's *reserved*
segments plus what lives outside the allocator no longer fit the card. The difference is a handful of terms, each
modelled here from the source that allocates it (docs/memory-model.md, "GPU overheads", lists them with sources):

- **allocator rounding and segments** (``c10/cuda/CUDACachingAllocator.cpp``): every request is rounded up to a
  multiple of 512 bytes; requests up to 1 MiB are carved from 2 MiB segments, 1-10 MiB ones from 20 MiB segments,
  larger ones get a segment of their own rounded up to 2 MiB. A block keeps a remainder of at most 1 MiB (it counts
  as allocated); a larger remainder is split off as a free block (reserved, not allocated).
- **cuBLAS workspaces** (``aten/src/ATen/cuda/CublasHandlePool.cpp``): one per (thread, stream), taken from the
  caching allocator: ``CUBLAS_WORKSPACE_CONFIG`` or its default, ``:4096:8`` (32 MiB) on sm90/sm100/sm120 and
  ``:4096:2:16:8`` (8 MiB + 128 KiB) before. cuBLASLt shares it (unified workspaces, torch's default). A training
  step uses two: the thread running forward and the optimizer, and autograd's device thread running backward.
- **DDP's gradient buckets** (``torch/csrc/distributed/c10d/reducer.cpp``): with ``gradient_as_bucket_view=False``
  (the default, and the runner's) the reducer allocates flat buckets as large as all gradients together.
- **NCCL's buffers** (``src/init.cc``: ``DEFAULT_LL_BUFFSIZE``, ``DEFAULT_LL128_BUFFSIZE``, ``DEFAULT_BUFFSIZE``),
  outside the allocator, per channel and peer connection, for runs with more than one rank.
- **DeepSpeed's** ``temp_grad_buffer_for_gpu_offload`` (``deepspeed/runtime/zero/stage_1_and_2.py``): ZeRO with
  CPU offload allocates one device buffer of the largest trainable parameter's size, in the trainable weights'
  dtype, when the optimizer is built; it lives for the whole run.
- **the CUDA context** (driver, kernels, module images): outside the allocator, about 0.5 GiB on A100/H100 with
  CUDA 12's lazy module loading.

Nothing here creates a CUDA context: the local GPU's free memory comes from NVML (the driver's own figure, which
is what ``cudaMemGetInfo`` reports), or from ``torch.cuda.mem_get_info`` only when this process already holds a
context on that device (the runner's child estimating before it loads).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MIB = 1024**2

# c10/cuda/CUDACachingAllocator.cpp (c10/core/AllocatorConfig.h in torch 2.13): the caching allocator's sizes.
K_MIN_BLOCK_SIZE = 512  # every request is rounded up to a multiple of 512 bytes
K_SMALL_SIZE = 1 * MIB  # the largest "small" request; also the largest remainder a block keeps unsplit
K_SMALL_BUFFER = 2 * MIB  # small requests are carved from 2 MiB segments
K_LARGE_BUFFER = 20 * MIB  # requests between 1 and 10 MiB are carved from 20 MiB segments
K_MIN_LARGE_ALLOC = 10 * MIB  # from 10 MiB on a request gets a segment of its own ...
K_ROUND_LARGE = 2 * MIB  # ... rounded up to 2 MiB

# The CUDA context of the process that trains: the driver's per-process state, the kernels and module images it
# loads (lazily since CUDA 11.7), cuBLAS/cuDNN handles. Outside the caching allocator, so never in
# memory_reserved(), but in nvidia-smi's per-process figure. About 0.5 GiB on A100/H100 with CUDA 12 and torch 2.x
# (PyTorch's "CUDA semantics" notes; measured on the first lent GPU with benchmarks/predicted_vs_measured.py).
CUDA_CONTEXT_BYTES = 500 * MIB

# aten/src/ATen/cuda/CublasHandlePool.cpp, parseChosenWorkspaceSize(): the default CUBLAS_WORKSPACE_CONFIG.
CUBLAS_WORKSPACE_32MB_ARCHS = (9, 10, 12)  # Hopper and Blackwell: ":4096:8"
CUBLAS_WORKSPACE_32MB = 4096 * 1024 * 8
CUBLAS_WORKSPACE_OLDER = 4096 * 1024 * 2 + 16 * 1024 * 8  # ":4096:2:16:8"
# The workspace map is thread-local and keyed by stream: the main thread (forward, optimizer step) and autograd's
# device thread (backward, checkpointed recomputation) each get one on the default stream.
CUBLAS_THREADS = 2

# NCCL src/init.cc: per channel and peer connection, one buffer per protocol.
NCCL_LL_BUFFSIZE = 8 * 512 * 8 * 16  # NCCL_LL_LINES_PER_THREAD x NCCL_LL_MAX_NTHREADS x NCCL_STEPS x 16 B lines
NCCL_LL128_BUFFSIZE = 120 * 640 * 8 * 8  # NCCL_LL128_ELEMS_PER_THREAD x NCCL_LL128_MAX_NTHREADS x NCCL_STEPS x 8 B
NCCL_SIMPLE_BUFFSIZE = 1 << 22  # DEFAULT_BUFFSIZE, 4 MiB (NCCL_BUFFSIZE)
# Channels NCCL opens for all-reduce on an NVLink node of A100/H100s (2-4 over PCIe), and the connections each
# keeps buffers for (its ring neighbour and its tree parent/child). Calibrate on a multi-GPU machine.
NCCL_CHANNELS = 16
NCCL_CONNECTIONS_PER_CHANNEL = 2
NCCL_BYTES_PER_RANK = (
    NCCL_CHANNELS * NCCL_CONNECTIONS_PER_CHANNEL * (NCCL_LL_BUFFSIZE + NCCL_LL128_BUFFSIZE + NCCL_SIMPLE_BUFFSIZE)
)


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def round_size(n: int) -> int:
    """The caching allocator's ``round_size``: a block of at least 512 bytes, a multiple of 512."""
    return K_MIN_BLOCK_SIZE if n < K_MIN_BLOCK_SIZE else round_up(n, K_MIN_BLOCK_SIZE)


def allocation_size(rounded: int) -> int:
    """The caching allocator's ``get_allocation_size``: the segment ``cudaMalloc`` gets for a new block."""
    if rounded <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if rounded < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return round_up(rounded, K_ROUND_LARGE)


@dataclass(frozen=True)
class Packing:
    """Tensors as the caching allocator holds them: their bytes, the blocks (``allocated``), the segments."""

    requested: int  # the tensors' own bytes
    allocated: int  # blocks: rounded to 512 B, large ones with the remainder they keep
    reserved: int  # segments
    tails: int = 0  # of reserved - allocated: the free tail of the last 2 MiB and 20 MiB segment (once per pool)

    @property
    def rounding(self) -> int:
        """Inside ``memory_allocated``: what the blocks add to the tensors."""
        return self.allocated - self.requested

    @property
    def segments(self) -> int:
        """``memory_reserved - memory_allocated``: free space inside the segments."""
        return self.reserved - self.allocated

    @property
    def per_tensor_segments(self) -> int:
        """The free space that grows with the number of tensors: remainders split off large blocks."""
        return self.segments - self.tails


def pack(sizes: Iterable[int]) -> Packing:
    """What the allocator holds for tensors of these sizes, all alive, allocated one after another in fresh segments.

    Large requests (10 MiB and more) get a segment each, rounded up to 2 MiB: a remainder above 1 MiB is split off as
    a free block, a smaller one stays with the block. Smaller requests share segments: the 1-10 MiB ones fill 20 MiB
    segments, those up to 1 MiB fill 2 MiB segments; the model packs each pool tightly (its last segment's free tail
    is the waste). This is the allocator without churn: blocks freed and reused over a step can leave more free
    space in segments (fragmentation proper), which the allocator only gives back when a ``cudaMalloc`` fails.
    """
    requested = allocated = reserved = 0
    small = mid = 0
    for n in sizes:
        if n <= 0:  # empty tensors allocate nothing
            continue
        requested += n
        r = round_size(n)
        if r <= K_SMALL_SIZE:
            small += r
        elif r < K_MIN_LARGE_ALLOC:
            mid += r
        else:
            seg = allocation_size(r)
            allocated += r if seg - r > K_SMALL_SIZE else seg
            reserved += seg
    allocated += small + mid
    tails = round_up(small, K_SMALL_BUFFER) - small + round_up(mid, K_LARGE_BUFFER) - mid
    reserved += small + mid + tails
    return Packing(requested, allocated, reserved, tails)


def cublas_workspace_bytes(capability: tuple[int, int] | None, env: str | None = None) -> int:
    """One cuBLAS workspace as torch sizes it: ``CUBLAS_WORKSPACE_CONFIG`` (``:SIZE_KiB:COUNT`` pairs) or the default.

    ``capability`` is the GPU's compute capability; unknown (no GPU here) counts as sm90, the larger default.
    """
    default = (
        CUBLAS_WORKSPACE_32MB
        if capability is None or capability[0] in CUBLAS_WORKSPACE_32MB_ARCHS
        else CUBLAS_WORKSPACE_OLDER
    )
    if env is None:
        return default
    pairs = re.findall(r":([0-9]+):([0-9]+)", env)
    if not pairs:
        return default  # torch warns and uses the default
    return sum(int(size) * 1024 * int(count) for size, count in pairs)


def nccl_buffer_bytes(world_size: int) -> int:
    """NCCL's device buffers of one rank: none for a single rank (no peer to connect to)."""
    return NCCL_BYTES_PER_RANK if world_size > 1 else 0


def deepspeed_offload_buffer_bytes(largest_trainable_numel: int, itemsize: int) -> int:
    """``temp_grad_buffer_for_gpu_offload``: ``torch.zeros(largest_param_numel, dtype=self.dtype)`` on the device."""
    return largest_trainable_numel * itemsize


@dataclass(frozen=True)
class Overheads:
    """GPU memory a CUDA run needs besides its predicted allocated peak, per term (bytes)."""

    allocator_rounding: int  # inside memory_allocated: blocks rounded to 512 B, remainders kept by large blocks
    allocator_segments: int  # memory_reserved - memory_allocated: free space in the segments at the peak
    cublas_workspaces: int  # inside the allocator
    ddp_buckets: int  # inside the allocator: DDP's flat gradient buckets
    deepspeed_offload_buffer: int  # inside the allocator: ZeRO offload's device gradient buffer
    nccl_buffers: int  # outside the allocator
    cuda_context: int  # outside the allocator (0 when the free memory already excludes this process's context)

    FIELDS = (
        "allocator_rounding",
        "allocator_segments",
        "cublas_workspaces",
        "ddp_buckets",
        "deepspeed_offload_buffer",
        "nccl_buffers",
        "cuda_context",
    )

    @property
    def inside_allocator(self) -> int:
        """What ``memory_allocated`` shows besides the predicted peak."""
        return self.allocator_rounding + self.cublas_workspaces + self.ddp_buckets + self.deepspeed_offload_buffer

    @property
    def reserved(self) -> int:
        """What ``memory_reserved`` shows besides the predicted peak."""
        return self.inside_allocator + self.allocator_segments

    @property
    def total(self) -> int:
        return self.reserved + self.nccl_buffers + self.cuda_context

    def to_json(self) -> dict[str, int]:
        return {**{k: int(getattr(self, k)) for k in self.FIELDS}, "total": int(self.total)}

    def describe(self) -> str:
        """One line for people: every term that is not zero."""
        from blipmon.core.units import fmt_bytes

        names = {
            "allocator_rounding": "allocator rounding",
            "allocator_segments": "free in allocator segments",
            "cublas_workspaces": "cuBLAS workspaces",
            "ddp_buckets": "DDP gradient buckets",
            "deepspeed_offload_buffer": "DeepSpeed offload gradient buffer",
            "nccl_buffers": "NCCL buffers",
            "cuda_context": "CUDA context",
        }
        parts = [f"{names[k]} {fmt_bytes(getattr(self, k))}" for k in self.FIELDS if getattr(self, k)]
        return f"GPU overheads beside the allocated peak: {', '.join(parts) or 'none'} = {fmt_bytes(self.total)}"


NO_OVERHEADS = Overheads(0, 0, 0, 0, 0, 0, 0)


# ----------------------------------------------------------------------------------------------------------------
# The local GPU


@dataclass(frozen=True)
class LocalGpu:
    """What this machine's first visible GPU (the one a single-rank run uses) says, without a new CUDA context."""

    total: int
    free: int | None  # None when no figure could be read without creating a context
    own_context: bool  # this process already holds a context there (its memory is outside ``free``)
    capability: tuple[int, int] | None
    how: str  # where ``free`` came from, or why it is missing


def local_gpu(index: int = 0) -> LocalGpu | None:
    """``cuda:index`` of this machine, or None when torch sees no GPU. Never creates a CUDA context."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(index)  # the driver's attributes: no context
        total = int(props.total_memory)
        capability = (int(props.major), int(props.minor))
    except Exception:  # noqa: BLE001 - a broken driver is "no GPU" here
        return None
    own = _has_context(index)
    if own:
        try:
            free, total = (int(x) for x in torch.cuda.mem_get_info(index))
            return LocalGpu(total, free, True, capability, "torch.cuda.mem_get_info (this process's context)")
        except Exception as e:  # noqa: BLE001
            return LocalGpu(total, None, True, capability, f"mem_get_info failed: {type(e).__name__}")
    free, how = _nvml_free(index)
    return LocalGpu(total, free, False, capability, how)


def _has_context(index: int) -> bool:
    try:
        import torch

        return bool(torch.cuda.is_initialized() and torch._C._cuda_hasPrimaryContext(index))
    except Exception:  # noqa: BLE001 - unknown: assume none (the context is then counted, the safe side)
        return False


def _nvml_free(index: int, *, module: Any = None, identity: Any = None) -> tuple[int | None, str]:
    """Free memory of torch's ``cuda:index`` from NVML (no CUDA context); (None, why) when NVML cannot say.

    The device is found the way the sampler finds it (``runner.nvml``: torch's UUID, then its PCI bus id,
    then ``CUDA_VISIBLE_DEVICES``), never by torch's index alone: CUDA numbers GPUs fastest first and
    ``CUDA_VISIBLE_DEVICES`` renumbers them, so NVML's device ``index`` may be another card. On a MIG GPU
    the MIG device is read, not its parent (whose free memory would be the whole card's). ``module`` and
    ``identity`` stand in for ``pynvml`` and torch's device identity in tests.
    """
    from blipmon.runner.nvml import Nvml

    try:
        nv = Nvml(module)
        dev = nv.for_torch_device(index, identity=identity)
        if dev is None:
            return None, "NVML: no device matches torch's"
        info = nv.nv.nvmlDeviceGetMemoryInfo(dev.handle)
        free, total = int(info.free), int(info.total)
    except Exception as e:  # noqa: BLE001 - no NVML, no permission: the card's total is judged instead
        return None, f"NVML unavailable ({type(e).__name__})"
    return min(free, total), f"NVML ({dev.label}, matched by {dev.how})"


def cublas_env() -> str | None:
    return os.environ.get("CUBLAS_WORKSPACE_CONFIG")


def describe_local(g: LocalGpu) -> str:
    from blipmon.core.units import fmt_bytes

    if g.free is None:
        return f"local GPU, {fmt_bytes(g.total)} total (free memory unknown: {g.how})"
    return f"free on the local GPU: {fmt_bytes(g.free)} of {fmt_bytes(g.total)}, {g.how}"
