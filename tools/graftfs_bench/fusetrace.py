"""How long each FUSE request of one mount took, as the kernel saw it (its fuse tracepoints).

The kernel records ``fuse_request_send`` when a process's request is queued for the daemon and
``fuse_request_end`` when the daemon's answer arrives: their difference is what the process
waited, including the daemon's queue and its wake-up, which the daemon's own per-handler times
leave out. Summed over a workload, it is the time graftfs added to the workload's critical path
(requests of concurrent processes overlap, so the sum is an upper bound). Releases are sent in
the background when a file is closed: nobody waits for them, so they are listed but not summed.

The tracepoints need tracefs (mounted here at /sys/kernel/tracing when it is not: what perf
and bpftrace do too) and a kernel recent enough to have them (this VM's 6.18 has); without
them the benchmark says so and prints the rest.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = TRACEFS / "events" / "fuse"
#: Trace buffer per CPU: a podman run makes ~300 requests, two events each.
BUFFER_KB = 32768

#: Requests the kernel sends in the background: the closing process does not wait for them.
BACKGROUND = frozenset({"FUSE_RELEASE", "FUSE_RELEASEDIR"})

_SEND = re.compile(r"\s([\d.]+): fuse_request_send: connection (\d+) req (\d+) opcode \d+ \((\w+)\)")
_END = re.compile(r"\s([\d.]+): fuse_request_end: connection (\d+) req (\d+) ")


@dataclass
class RequestLatency:
    """Per opcode: requests answered and the seconds processes waited for them."""

    count: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def total_seconds(self) -> float:
        """Seconds processes waited: the background requests (BACKGROUND) left out."""
        return sum(secs for op, secs in self.seconds.items() if op not in BACKGROUND)

    @property
    def background_seconds(self) -> float:
        """Seconds the daemon spent on requests nobody waited for (BACKGROUND)."""
        return sum(secs for op, secs in self.seconds.items() if op in BACKGROUND)

    def per_run(self, runs: int, waited: bool = True) -> dict[str, dict[str, float]]:
        """Requests and milliseconds per run, by opcode, most time first: of the requests
        processes waited for, or (``waited`` False) of the BACKGROUND ones."""
        rows = sorted(((op, secs) for op, secs in self.seconds.items() if (op not in BACKGROUND) == waited),
                      key=lambda kv: -kv[1])
        return {op.removeprefix("FUSE_").lower(): {"requests": round(self.count[op] / runs, 1),
                                                    "ms": round(secs * 1000 / runs, 2)} for op, secs in rows}


def available() -> str | None:
    """None when the tracepoints can be used, else why not (mounting tracefs if needed)."""
    if not TRACEFS.joinpath("events").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True, timeout=30,
                       check=False)
    if not EVENTS.joinpath("fuse_request_send").is_dir():
        return "this kernel has no fuse tracepoints"
    if not os.access(EVENTS / "enable", os.W_OK):
        return "the fuse tracepoints cannot be enabled (root is needed)"
    return None


class FuseTrace:
    """Records the requests of the FUSE mounts ``mountpoints`` (by name) between start() and stop()."""

    def __init__(self, mountpoints: dict[str, Path]) -> None:
        # the kernel names a FUSE connection by its superblock's device number: major 0, the minor
        self.connections = {str(os.minor(os.stat(mnt).st_dev)): name for name, mnt in mountpoints.items()}

    def start(self) -> None:
        (TRACEFS / "buffer_size_kb").write_text(f"{BUFFER_KB}\n")
        (TRACEFS / "trace").write_text("")
        (EVENTS / "enable").write_text("1\n")

    def stop(self) -> dict[str, RequestLatency]:
        (EVENTS / "enable").write_text("0\n")
        text = (TRACEFS / "trace").read_text(errors="replace")
        (TRACEFS / "trace").write_text("")
        return self._parse(text)

    def _parse(self, text: str) -> dict[str, RequestLatency]:
        sent: dict[tuple[str, str], tuple[float, str]] = {}
        out = {name: RequestLatency() for name in self.connections.values()}
        for line in text.splitlines():
            if (m := _SEND.search(line)) is not None:
                if m.group(2) in self.connections:
                    sent[(m.group(2), m.group(3))] = (float(m.group(1)), m.group(4))
            elif (m := _END.search(line)) is not None and (m.group(2), m.group(3)) in sent:
                started, op = sent.pop((m.group(2), m.group(3)))
                latency = out[self.connections[m.group(2)]]
                latency.count[op] += 1
                latency.seconds[op] += float(m.group(1)) - started
        return out
