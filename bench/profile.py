"""
Optional profiling of the daemon during a measurement window with py-spy
(C{python -m bench --profile DIR}): one collapsed-stack file per window and
a short text summary of the hottest functions (own and inclusive samples).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

__all__ = ["Profiler", "summarize"]


class Profiler:
    """C{py-spy record} attached to one process for a fixed time."""

    def __init__(self, pid: int, out: Path, seconds: float, rate: int = 250) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(rate),
             "--format", "raw", "--nonblocking", "--gil", "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finish(self, top: int = 25) -> str:
        """Wait for py-spy, write C{<out>.txt} with the summary, return it."""
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return ""
        if not self.out.exists():
            return ""
        text = summarize(self.out.read_text(), top)
        self.out.with_suffix(".txt").write_text(text)
        return text


def summarize(raw: str, top: int = 25) -> str:
    """The hottest frames of py-spy's collapsed stacks: own samples and inclusive samples."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.strip() for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "no samples\n"
    lines = [f"{total} samples (GIL held)", "", "own %  frame"]
    lines += [f"{100 * n / total:5.1f}  {f}" for f, n in own.most_common(top)]
    lines += ["", "incl % frame"]
    lines += [f"{100 * n / total:5.1f}  {f}" for f, n in incl.most_common(top)]
    return "\n".join(lines) + "\n"
