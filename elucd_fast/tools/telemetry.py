"""GPU telemetry through NVML (power, energy, memory, utilisation, clocks), sampled in a
background thread while a profile runs (`pip install -e '.[gpu]'` for nvidia-ml-py)."""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import numpy as np
import torch


class TelemetryUnavailable(RuntimeError):
    """No GPU telemetry can be read; the message says why."""


_TELEMETRY_FIELDS = ("power_w", "energy_j", "memory_used_bytes", "gpu_util_percent", "memory_util_percent",
                     "sm_clock_mhz", "memory_clock_mhz")


class GpuTelemetry:
    """Samples one GPU through NVML in a background thread while the context is open.

    Each sample: t (time.monotonic seconds), power_w, energy_j (the driver's energy counter),
    memory_used_bytes, gpu_util_percent, memory_util_percent, sm_clock_mhz, memory_clock_mhz; a
    quantity the GPU does not report is None. Closing the context shuts NVML down.
    """

    def __init__(self, nvml, handle, interval_s: float):
        self.nvml, self.handle, self.interval_s = nvml, handle, interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-telemetry", daemon=True)

    def __enter__(self) -> GpuTelemetry:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self._read())
        self.nvml.nvmlShutdown()

    def _run(self) -> None:
        self.samples.append(self._read())
        while not self._stop.wait(self.interval_s):
            self.samples.append(self._read())

    def _query(self, read: Callable[[], float]) -> float | None:
        try:
            return float(read())
        except self.nvml.NVMLError:  # e.g. a quantity this GPU model does not expose
            return None

    def _read(self) -> dict:
        nvml, handle = self.nvml, self.handle
        memory = self._query(lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used)
        return {"t": time.monotonic(),
                "power_w": self._query(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1e3),  # mW
                "energy_j": self._query(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3),  # mJ
                "memory_used_bytes": memory,
                "gpu_util_percent": self._query(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                "memory_util_percent": self._query(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).memory),
                "sm_clock_mhz": self._query(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
                "memory_clock_mhz": self._query(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM))}

    def summary(self, windows: list[tuple[float, float]] | None = None) -> dict:
        """Over the samples inside `windows` ((start, end) pairs of time.monotonic seconds; None:
        all samples): their count, mean and max power (W), energy (J: the counter's rise within
        each window, summed, or integrated power where the GPU has no counter; resolution one
        interval), peak memory (bytes), mean utilisation (%) and mean clocks (MHz)."""
        spans = windows if windows is not None else [(-math.inf, math.inf)]
        groups = [[s for s in self.samples if start <= s["t"] <= end] for start, end in spans]
        window = [s for group in groups for s in group]

        def values(key: str) -> list[float]:
            return [s[key] for s in window if s[key] is not None]

        def mean(key: str) -> float | None:
            found = values(key)
            return float(np.mean(found)) if found else None

        energy_j = None
        for group in groups:  # each window's own rise, so the gaps between windows do not count
            energy = [s["energy_j"] for s in group if s["energy_j"] is not None]
            power = [(s["t"], s["power_w"]) for s in group if s["power_w"] is not None]
            if len(energy) >= 2:
                energy_j = (energy_j or 0.0) + energy[-1] - energy[0]
            elif len(power) >= 2:
                times, watts = zip(*power)
                energy_j = (energy_j or 0.0) + float(np.trapezoid(watts, times))
        return {"samples": len(window), "power_w_mean": mean("power_w"),
                "power_w_max": max(values("power_w"), default=None), "energy_j": energy_j,
                "memory_used_bytes_max": max(values("memory_used_bytes"), default=None),
                "gpu_util_percent_mean": mean("gpu_util_percent"),
                "memory_util_percent_mean": mean("memory_util_percent"),
                "sm_clock_mhz_mean": mean("sm_clock_mhz"), "memory_clock_mhz_mean": mean("memory_clock_mhz")}


def gpu_telemetry(device: torch.device | str, interval_s: float = 0.1) -> GpuTelemetry:
    """Telemetry of the GPU that `device` names, found by PCI bus id (NVML numbers GPUs
    regardless of CUDA_VISIBLE_DEVICES). Raises TelemetryUnavailable with the reason when the
    device is not a CUDA GPU, nvidia-ml-py is not installed, or NVML cannot open the GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        raise TelemetryUnavailable(f"device {device} is not a CUDA GPU")
    try:
        import pynvml
    except ImportError:
        raise TelemetryUnavailable("nvidia-ml-py (pynvml) is not installed") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        raise TelemetryUnavailable(f"NVML did not start ({err})") from None
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        bus_id = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
    except (pynvml.NVMLError, RuntimeError, AssertionError) as err:  # torch raises these without a usable GPU
        pynvml.nvmlShutdown()
        raise TelemetryUnavailable(f"NVML cannot open {device} ({err})") from None
    return GpuTelemetry(pynvml, handle, interval_s)
