"""How busy the machine was when a figure was taken: every benchmark prints it beside its figures,
because other work on a 2-core machine lowers them all (compare rows of one run)."""
from __future__ import annotations

import os
from pathlib import Path


def machine() -> str:
    try:
        psi = Path("/proc/pressure/cpu").read_text().split()[1].replace("avg10=", "")
        psi = f", cpu pressure {psi}% (avg10)"
    except (OSError, IndexError):
        psi = ""
    return f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}{psi}, {os.cpu_count()} cores"
