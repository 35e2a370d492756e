"""Dense bf16 tensor-core peaks per accelerator, for MFU.

MFU is only meaningful against the datasheet peak of the card actually used, so an unknown card
gives ``None`` (no MFU is reported) instead of a guess; ``logging.peak_tflops`` overrides the table
(e.g. for power-capped parts or a card missing here).

Numbers are DENSE bf16 (the "with sparsity" datasheet figures are 2x these).
"""
from __future__ import annotations

from typing import Optional

# Ordered: the first (all-substrings-match) entry wins, so specific variants precede families.
# Matching is on the lower-cased torch.cuda.get_device_name() string.
_PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("gh200",), 989.4),
    (("h200", "nvl"), 835.0),
    (("h200",), 989.4),
    (("h100", "pcie"), 756.0),
    (("h100", "nvl"), 835.0),
    (("h100",), 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (("h800", "pcie"), 756.0),
    (("h800",), 989.4),
    (("h20",), 148.0),
    (("gb200",), 2500.0),
    (("b200",), 2250.0),
    (("b100",), 1750.0),
    (("a100",), 312.0),
    (("a800",), 312.0),
    (("l40s",), 362.1),
    (("l40",), 181.0),
    (("l4",), 121.0),
    (("mi300x",), 1307.4),
    (("mi325x",), 1307.4),
    (("mi250x",), 383.0),
)


def lookup_peak_tflops(device_name: str) -> Optional[float]:
    """Dense bf16 peak TFLOP/s for a device name, or None when the card is not in the table."""
    name = device_name.lower()
    for needles, peak in _PEAK_BF16_TFLOPS:
        if all(n in name for n in needles):
            return peak
    return None


def current_device_name() -> Optional[str]:
    """Name of the current CUDA device, or None without CUDA (CPU runs have no MFU)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(torch.cuda.current_device())


def resolve_peak_tflops(override: Optional[float] = None,
                        device_name: Optional[str] = None) -> Optional[float]:
    """Peak to compute MFU against: the override if set, else the table entry for the device.

    ``device_name=None`` asks CUDA for the current device.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"logging.peak_tflops must be > 0 (or null for the table), got {override}")
        return float(override)
    if device_name is None:
        device_name = current_device_name()
    if device_name is None:
        return None
    return lookup_peak_tflops(device_name)
