"""The Python API: `simulate`, `launch`, `compare` and `load_run`, each returning values.

A scenario is given as a path to its TOML file, a `Scenario`, or a dict shaped like
the file (None: the built-in quickstart). Runs go to `out` (default
`runs/<name>/<mode>`, as the CLI). Every function returns a `Result` (see
`p2pfl.record.runs`), or for `compare` one per mode plus the report.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from p2pfl.config.loader import parse, with_mode
from p2pfl.config.schema import Scenario, ScenarioError, dumps
from p2pfl.record.runs import Result, load_run
from p2pfl.runtime import roles

ScenarioLike = str | Path | Scenario | dict[str, Any] | None


def scenario_of(scenario: ScenarioLike, mode: str | None = None) -> Scenario:
    """A checked `Scenario` from any of the accepted forms; raises ScenarioError."""
    if isinstance(scenario, Scenario):
        s = scenario
    elif isinstance(scenario, dict):
        s = parse(scenario)
    elif scenario is None or isinstance(scenario, str | Path):
        s = roles.scenario(None if scenario is None else Path(scenario))
    else:
        raise ScenarioError(f"scenario: expected a path, a Scenario or a dict, got {scenario!r}")
    return with_mode(s, mode) if mode is not None else s


def _console(progress: bool) -> Console:
    return Console() if progress else Console(quiet=True)


def simulate(
    scenario: ScenarioLike = None,
    *,
    model: Any = None,
    data: Any = None,
    out: str | Path | None = None,
    mode: str | None = None,
    progress: bool = True,
    distributed: tuple[str, int, int] | None = None,
) -> Result:
    """Every peer of `scenario` in this process (the simulator engine); its run folder
    is written as `p2pfl simulate` writes it.

    `model`: a factory `(n_features, n_classes, key)` returning an `(init, apply)` pair,
    a Flax or an Equinox module; `data`: a loader `() -> (x, y[, x_holdout,
    y_holdout])` or those arrays. Either overrides the scenario's model / dataset.
    `distributed`: `(coordinator_address, num_processes, process_id)` to share the
    peers with other processes running the same call (`jax.distributed`; before this
    process has run anything on JAX); every one gets the whole `Result`, the first
    writes the run folder.
    """
    from p2pfl.app import simulate as sim
    from p2pfl.runtime.process import Distributed

    s = scenario_of(scenario, mode)
    folder = roles.run_folder(out, s)
    d = None if distributed is None else Distributed(*distributed)
    return sim.run(
        s, folder, _console(progress), library=True, model=model, data=data, distributed=d
    )


_PATH_FIELDS = (("data", "path"), ("data", "holdout"), ("topology", "file"))


def _file_for(s: Scenario, folder: Path) -> Path:
    """A TOML file the peer processes can load: `s` with its relative paths made absolute."""
    raw = s.model_dump(mode="json", exclude_none=True)
    for section, name in _PATH_FIELDS:
        value = raw.get(section, {}).get(name)
        if isinstance(value, str) and not Path(value).is_absolute():
            if section == "data" and name == "path":
                base = str(Path(s.base_dir).absolute()).replace("{", "{{").replace("}", "}}")
                raw[section][name] = str(Path(base) / value)
            else:
                raw[section][name] = str(s.resolve(value).absolute())
    path = folder / f"{s.name}.toml"
    path.write_text(dumps(raw))
    return path


def launch(
    scenario: ScenarioLike = None,
    *,
    out: str | Path | None = None,
    mode: str | None = None,
    progress: bool = True,
) -> Result:
    """Every peer of `scenario` as its own process on this machine (`p2pfl launch`).

    A custom model or dataset reaches the peer processes only by name: the scenario's
    `model.factory` / `data.loader` ("module:function"). Raises RuntimeError when the
    launch itself fails (ports in use, the forkserver).
    """
    from p2pfl.app.launch import launch as run_launch
    from p2pfl.app.ports import LaunchError

    s = scenario_of(scenario, mode)
    folder = roles.run_folder(out, s)
    path = Path(scenario) if isinstance(scenario, str | Path) else None
    with tempfile.TemporaryDirectory(prefix="p2pfl-") as tmp:
        file = path if path is not None and mode is None else _file_for(s, Path(tmp))
        try:
            run_launch(s, file, folder, _console(progress))
        except LaunchError as exc:
            raise RuntimeError(str(exc)) from None
    return load_run(folder)


@dataclass
class Comparison:
    """`compare`'s result: each mode's run and the report `compare.json` holds."""

    centralized: Result
    gossip: Result
    report: dict[str, Any]


def compare(
    scenario: ScenarioLike = None,
    *,
    engine: str = "sim",
    out: str | Path | None = None,
    target: float | None = None,
    progress: bool = True,
) -> Comparison:
    """The scenario centralized, then gossip (simulated, or `engine = "launch"`: as
    processes), and the comparison `p2pfl compare` writes to `out`."""
    from p2pfl.app.compare import build_report, write_outputs

    if engine not in ("sim", "launch"):
        raise ValueError(f"engine = {engine!r}: expected 'sim' or 'launch'")
    base = scenario_of(scenario)
    root = Path(out) if out else Path("runs") / base.name
    run = simulate if engine == "sim" else launch
    results = {
        m: run(with_mode(base, m), out=root / m, progress=progress)
        for m in ("centralized", "gossip")
    }
    report = build_report(root / "centralized", root / "gossip", target)
    write_outputs(report, root / "centralized", root / "gossip", root)
    return Comparison(results["centralized"], results["gossip"], report)


__all__ = ["Comparison", "Result", "compare", "launch", "load_run", "scenario_of", "simulate"]
