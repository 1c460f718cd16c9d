"""Timing and memory for the benchmarks: wall time with the device drained, peak memory, the
device's peak throughput, host-device syncs, and what the results were measured on.

Memory: both libraries' models stay loaded side by side (so the runs can alternate), so a run's
figure is its own models' bytes (weights, buffers, optimizer state) plus the peak it adds while
running: CUDA's allocator peak (torch.cuda.max_memory_allocated) on a GPU, or on the CPU the
process's resident set size sampled every millisecond (approximate: the allocator may keep freed
memory, and a briefer peak can be missed).
"""

import datetime
import os
import platform
import statistics
import sys
import threading
import time
import warnings

import torch

# Dense 16-bit (bf16/fp16) tensor-core peaks from the vendors' spec sheets, TFLOP/s, by device
# name (first match wins: the PCIe and NVL H100s come before the SXM one). An H100 is sometimes
# taken at about 800 (docs/performance.md); the SXM spec sheet says 989.
PEAK_TFLOPS_16BIT = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                     ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0),
                     ("RTX 4090", 165.0)]
GB = 2**30


def drain(device: torch.device) -> None:
    """Wait until the device has finished the work queued so far (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds that fn() takes, queued work included."""
    drain(device)
    start = time.perf_counter()
    fn()
    drain(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def alternate(runs: dict, repeats: int,
              device: torch.device) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Each of `runs` (name -> function) timed `repeats` times, alternating A B B A ... so that a slow
    stretch of the machine falls on both alike: (seconds per run, peak bytes above the start) by name."""
    seconds, peaks = {name: [] for name in runs}, {name: 0 for name in runs}
    for r in range(repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            with Peak(device) as peak:
                seconds[name].append(timed(runs[name], device))
            peaks[name] = max(peaks[name], peak.bytes)
    return seconds, peaks


def rss() -> int:
    """This process's resident memory, bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def model_bytes(*objects) -> int:
    """Bytes held by modules' parameters and buffers and optimizers' state (AdamW's two moments)."""
    total = 0
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in [*obj.parameters(), *obj.buffers()])
        elif isinstance(obj, torch.optim.Optimizer):
            total += sum(v.numel() * v.element_size() for state in obj.state.values() for v in state.values()
                         if torch.is_tensor(v))
    return total


class Peak:
    """`with Peak(device) as p: ...`, then p.bytes: the most memory the block held above its start."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, 0

    def __enter__(self) -> "Peak":
        drain(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.high = rss()
            self.running = True
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def sample(self) -> None:
        while self.running:
            self.high = max(self.high, rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        drain(self.device)
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.running = False
            self.thread.join()
            self.bytes = max(self.high, rss()) - self.start


def count_syncs(fn, device: torch.device) -> int | None:
    """How many times fn() made the host wait for the GPU (torch's sync debug mode); None on the CPU."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {torch.get_num_threads()} threads"


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured TFLOP/s of a large square matmul: the practical peak where no spec figure applies."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    seconds = median([timed(lambda: a @ b, device) for _ in range(5)])
    return 2 * n**3 / seconds / 1e12


def device_peak(device: torch.device, dtype: torch.dtype, given: float | None = None) -> tuple[float, str]:
    """(peak TFLOP/s, where the figure comes from) for `fraction of peak`."""
    if given:
        return given, "given (--peak-tflops)"
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS_16BIT:
            if key in name:
                return tflops, f"spec sheet, dense 16-bit ({key})"
    return matmul_tflops(device, dtype), f"measured {str(dtype).removeprefix('torch.')} matmul"


def environment(device: torch.device, argv: list[str]) -> dict:
    """What the results were measured on, and how (argv: the bench's arguments)."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers"):
        module = sys.modules.get(name)
        versions[name] = getattr(module, "__version__", "not loaded")
    if device.type == "cuda":
        versions["cuda"] = torch.version.cuda
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m minisd.bench " + " ".join(argv), "device": device_name(device),
            "versions": versions}
