"""What the benchmarks read from /proc (Linux): CPU ticks of processes and of the machine, memory, page faults.

Imported by the bench scripts (`from _proc import ...`: bench/ is on sys.path when a script runs). Every reader
answers 0 / {} / None for a process that is gone instead of raising, since roles exit while a bench samples them.
"""

from __future__ import annotations

import os
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")  # clock ticks per second


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses): field 3 (state) first."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_ticks(pid: int | str = "self", *, reaped_children: bool = False) -> int:
    """utime + stime of a process (all its threads), in clock ticks; with reaped_children also the cutime + cstime
    of its children that it waited for (a finished run's work). 0 if gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0
    return sum(int(x) for x in fields[11 : 15 if reaped_children else 13])


def minor_faults(pid: int | str) -> int:
    """Minor page faults of a process so far (all its threads); 0 if gone."""
    fields = _stat_fields(pid)
    return 0 if fields is None else int(fields[7])


def system_ticks() -> tuple[int, int]:
    """(user + nice + system, steal) over all CPUs since boot, in clock ticks."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return vals[0] + vals[1] + vals[2], (vals[7] if len(vals) > 7 else 0)


def proc_status(pid: int | str, keys: tuple[str, ...] = ("VmRSS", "VmHWM", "Threads")) -> dict[str, int]:
    """Those lines of /proc/PID/status as integers (VmRSS / VmHWM in kB, Threads); {} if gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in keys:
                    out[key] = int(val.split()[0])
    except OSError:
        pass
    return out


def cpu_model() -> str:
    """The CPU's model name ("" when /proc/cpuinfo does not say)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def mem_total_mb() -> int | None:
    try:
        return int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) // 1024
    except (OSError, IndexError, ValueError):
        return None
