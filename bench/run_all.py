"""Run every benchmark and print one table: metric, value, target, ratio.

`python bench/run_all.py` runs transport, rounds, startup, memory, modes, curve_rounds
and flood one after the other (about five minutes in all) and prints the rows that
have a target, then (with --full) each benchmark's whole table. Each benchmark is
also a script of its own.
`--against REV` runs bench/rounds.py's comparison with git revision REV as well (ours /
REV for the median round and for round / compute floor; see bench/rounds.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import curve_rounds
import flood
import memory
import modes
import rounds
import startup
import transport
from _common import Row, add_quiet_arg, preamble, print_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="also print each benchmark's own table")
    p.add_argument(
        "--against",
        metavar="REV",
        help="rounds: also measure git revision REV and print ours / REV (bench/rounds.py)",
    )
    p.add_argument(
        "--repeat", type=int, default=1, metavar="N", help="rounds --against: alternate N times"
    )
    add_quiet_arg(p)
    args = p.parse_args()
    pre = preamble(args.wait_quiet)

    sections: list[tuple[str, list[Row], list[str]]] = []
    t0 = time.perf_counter()
    sections.append(("transport", transport.run(), []))
    sections.append(("rounds", *rounds.run(against=args.against, repeat=args.repeat)))
    sections.append(("startup", *startup.run()))
    sections.append(("memory", *memory.run()))
    sections.append(("modes", *modes.run()))
    sections.append(("curve_rounds", *curve_rounds.run()))
    sections.append(("flood", *flood.run()))
    elapsed = time.perf_counter() - t0

    if args.full:
        for name, rows, notes in sections:
            print_table(name, rows, notes)
    summary = [
        Row(f"{name}: {r.metric.strip()}", r.value, r.unit, r.target, r.better, r.note)
        for name, rows, _ in sections
        for r in rows
        if r.target is not None
    ]
    print_table(
        "p2pfl benchmarks (each figure measured in this run)",
        summary,
        [
            *pre,
            f"all benchmarks took {elapsed:.0f} s; ratio = value / target; "
            "run a benchmark's own script for its breakdown rows",
        ],
    )


if __name__ == "__main__":
    main()
