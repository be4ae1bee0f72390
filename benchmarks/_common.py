"""Helpers shared by the benchmark scripts: timing, FLOP counting, memory peaks and table printing."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count


os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's FlopCounterMode has no formula for the CPU flash-attention kernel that scaled_dot_product_attention
# dispatches to on CPU (torch 2.14), so attention would count as 0 FLOPs without this registration.
_cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _cpu_flash is not None:
    try:
        register_flop_formula(_cpu_flash)(_cpu_flash_attention_flops)
    except RuntimeError:
        pass  # a later torch ships its own formula


def set_threads(num_threads: int | None) -> int:
    if num_threads:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def machine_line() -> str:
    """Describe where the numbers were measured: CPU, threads, torch version, date."""
    device = "no accelerator"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {device}, "
        f"load average {os.getloadavg()[0]:.1f} (the CPUs are shared), {datetime.date.today().isoformat()}"
    )


def time_interleaved(functions: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Return the median wall time in seconds of each function, running them in turn so that load drift hits all."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def count_flops(function: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


class PeakTensorMemory(TorchDispatchMode):
    """Track the bytes of tensor storages created inside the mode that are alive at once, and their peak.

    Storages that existed before the mode was entered (weights, inputs) are not counted, so `peak_bytes` is the
    activation and workspace memory of the region. Memory that a kernel allocates internally without returning it
    as a tensor is not seen. With `include_meta=True`, meta tensors count at the size they would have, so a forward
    pass on the meta device traces the activation peak of a model too large to run here.
    """

    def __init__(self, include_meta: bool = False):
        super().__init__()
        self.include_meta = include_meta
        self.live_bytes = 0
        self.peak_bytes = 0
        self._seen: set[int] = set()

    def _release(self, storage_id: int, num_bytes: int) -> None:
        self._seen.discard(storage_id)
        self.live_bytes -= num_bytes

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        storage_id = id(storage)
        if storage_id in self._seen:
            return
        num_bytes = storage.nbytes()
        self._seen.add(storage_id)
        self.live_bytes += num_bytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._release, storage_id, num_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        # Views and in-place results share an input's storage (a weight's, for `W.t()` in a linear layer): skip them.
        input_storages = [
            tensor.untyped_storage()
            for tensor in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(tensor, torch.Tensor)
        ]
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        for item in outputs:
            if not isinstance(item, torch.Tensor) or (item.device.type == "meta" and not self.include_meta):
                continue
            storage = item.untyped_storage()
            if any(storage is input_storage for input_storage in input_storages):
                continue
            self._track(item)
        return output


def peak_tensor_bytes(function: Callable[[], object]) -> int:
    with PeakTensorMemory() as tracker:
        function()
    return tracker.peak_bytes


def peak_rss_delta_bytes(function: Callable[[], object], interval_s: float = 0.002) -> int:
    """Return the highest resident set size seen while `function` runs, minus the size before, sampled by a thread.

    A sampling thread can miss a short spike, and the allocator may reuse or keep freed pages, so this is a coarse
    process-level figure; `peak_tensor_bytes` is the finer one.
    """
    import threading

    import psutil

    process = psutil.Process()
    before = process.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        function()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    return peak[0] - before


def mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.1f}"


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """Print a Markdown table under a `###` title."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
