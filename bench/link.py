"""The proxies between the tools: tests/faultproxy.py, imported as it is.

FaultProxy counts bytes and cuts connections for the resume runs, and with
a `rate` and a `delay` it is the rate-limited link: a block enters at the
link rate (the bottleneck) and leaves `delay` later, with other blocks in
flight behind it, as on a real 100 Mbit/s path with 20 ms one way.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from faultproxy import Faults, FaultProxy, ProxyThread  # noqa: E402

__all__ = ["Faults", "FaultProxy", "ProxyThread", "link_faults"]


def link_faults(mbit_per_s: float, delay_ms: float) -> Faults:
    """A link of this rate and one-way delay."""
    return Faults(rate=mbit_per_s * 1e6 / 8, delay=delay_ms / 1000)
