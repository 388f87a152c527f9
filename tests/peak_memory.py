"""How much resident memory a piece of code takes at its peak, measured in a fresh process.

The code runs after ``setup`` in a child Python with torch on one thread and glibc returning
large blocks to the system (as ``exl2 quantize`` sets it), between a reset of the peak resident
set (``/proc/self/clear_refs``) and a read of it (``VmHWM``): Linux only."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_SCRIPT = """
import ctypes, sys, torch
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # as exl2 quantize: large blocks go back to the system
torch.set_num_threads(1)
def _status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
{setup}
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current resident set
_before = _status("VmRSS")
{measured}
print(_status("VmHWM") - _before - int(KEPT))
"""

SUPPORTED = sys.platform.startswith("linux")


def growth(setup: str, measured: str, *args: object) -> int:
    """Bytes the peak resident set rose by while ``measured`` ran, less ``KEPT`` (a name
    ``measured`` sets: bytes of its result that are meant to stay)."""
    script = _SCRIPT.format(setup=textwrap.dedent(setup), measured=textwrap.dedent(measured))
    r = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise AssertionError(r.stderr)
    return int(r.stdout)
