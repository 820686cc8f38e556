"""The `p2pfl` console script's first step: what must happen before anything is imported.

`p2pfl simulate` (and `p2pfl compare --engine sim`) re-execute themselves once under
glibc's allocator tunables (`runtime.process.tune_allocator`): the simulator makes and
frees many `[peers, d]` arrays. A command that forks peers (`launch`, `compare` with
its default engine) starts the forkserver first, so that its imports overlap the
launcher's own. Both kinds end, their run folders written and their children reaped,
without the interpreter's teardown (`runtime.process.quick_exit`). Everything else
goes straight to `app.cli`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def simulates(argv: Sequence[str]) -> bool:
    """Whether the command line `argv` (without the program) runs the simulator."""
    if argv[:1] == ["simulate"]:
        return True
    if argv[:1] != ["compare"]:
        return False
    pairs = zip(argv, [*argv[1:], ""], strict=True)
    return "--engine=sim" in argv or any(a == "--engine" and b == "sim" for a, b in pairs)


def launches(argv: Sequence[str]) -> bool:
    """Whether the command line `argv` forks peers from the launcher's forkserver."""
    return argv[:1] == ["launch"] or (argv[:1] == ["compare"] and not simulates(argv))


def main() -> int:
    """Entry point of the `p2pfl` console script and of `python -m p2pfl`."""
    from p2pfl.runtime import process

    argv = sys.argv[1:]
    helping = "-h" in argv or "--help" in argv
    simulating, launching = simulates(argv), launches(argv) and not helping
    if simulating:
        process.tune_allocator()
    elif launching:
        process.start_forkserver()
    from p2pfl.app.cli import main as cli_main

    code = cli_main()
    if simulating or launching:  # every file written, every child reaped
        process.quick_exit(code)
    return code
