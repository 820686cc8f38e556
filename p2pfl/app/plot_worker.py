"""A run's plots (`accuracy.png`, `privacy.png`), drawn here or by a helper process.

matplotlib takes ~0.3 s to import here, about a sixth of a small simulated run. A
`PlotWorker` is a fresh interpreter (`python -m p2pfl.app.plot_worker`) started when
the run starts: it imports matplotlib on the other core while the run goes on, then
reads one job (JSON on its stdin: the histories and where to write) at the run's end
and draws it. When it cannot (it died, failed or hung), the caller draws the job
itself, so a plot is never lost to the helper.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

TIMEOUT_S = 60.0  # longest wait for the helper's plots before drawing them here

Job = dict[str, Any]  # histories (peer -> rows), out, title, server rows, privacy


def job(
    histories: dict[int, list[dict[str, Any]]],
    out: Path,
    title: str,
    server: list[dict[str, Any]] | None,
    privacy: bool,
) -> Job:
    """What `draw` needs: every value plain JSON."""
    return {
        "histories": {str(i): rows for i, rows in histories.items()},
        "out": str(out),
        "title": title,
        "server": server,
        "privacy": privacy,
    }


def draw_here(j: Job) -> None:
    """Draw job `j`'s plots in this process."""
    from p2pfl.app.plots import accuracy_plot, privacy_plot

    histories = {int(i): rows for i, rows in j["histories"].items()}
    out = Path(j["out"])
    accuracy_plot(histories, out / "accuracy.png", j["title"], j["server"] or None)
    if j["privacy"]:
        privacy_plot(histories, out / "privacy.png", j["title"])


class PlotWorker:
    """The helper process (see the module docstring); it owns the child."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "p2pfl.app.plot_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def draw(self, j: Job) -> bool:
        """Hand job `j` to the helper and wait for it; whether it drew the plots."""
        try:
            self._proc.communicate(json.dumps(j).encode(), timeout=TIMEOUT_S)
        except (subprocess.TimeoutExpired, OSError, ValueError):
            self.close()
            return False
        return self._proc.returncode == 0

    def close(self) -> None:
        """Stop the helper if it is still there (a run that ended without plots)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def draw(j: Job, worker: PlotWorker | None = None) -> None:
    """Draw job `j`: by `worker` if there is one and it manages, else here."""
    if worker is None or not worker.draw(j):
        draw_here(j)


def main() -> None:
    """The helper: import matplotlib first (the point of it), then draw one job."""
    import p2pfl.app.plots  # noqa: F401

    draw_here(json.loads(sys.stdin.buffer.read()))


if __name__ == "__main__":
    main()
