"""The package surface: curated names, light imports, a working console entry point."""

from __future__ import annotations

import subprocess
import sys

import pytest

import p2pfl

pytestmark = pytest.mark.slow  # a fresh interpreter per check


def test_public_surface_is_curated():
    """Only the listed names are public; private helpers stay private."""
    public = {n for n in dir(p2pfl) if not n.startswith("_")}
    assert set(p2pfl.__all__) - {"__version__"} <= public
    assert "_runtime" not in p2pfl.__all__
    assert p2pfl.load_scenario is not None and p2pfl.Scenario().peers == 8


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        # the CLI must stay light: peers pay only for what they use
        ("p2pfl.app.cli", ("jax", "matplotlib", "rich", "optax", "sklearn")),
        # the peer's modules need JAX, not plotting (structlog pulls in rich)
        ("p2pfl.runtime.peer", ("matplotlib", "sklearn")),
        ("p2pfl.runtime.client", ("matplotlib", "sklearn")),
        ("p2pfl.runtime.coordinator", ("jax", "matplotlib", "sklearn")),  # JAX only as a server
        ("p2pfl.app.compare", ("matplotlib", "rich", "jax")),
    ],
)
def test_imports_stay_light(module, absent):
    """Importing a module does not load the heavy packages it does not need."""
    code = f"import sys, {module}; print(','.join(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_console_help_lists_the_commands():
    """`python -m p2pfl --help` names every subcommand."""
    out = subprocess.run(
        [sys.executable, "-m", "p2pfl", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("launch", "compare", "peer", "coordinator", "topology"):
        assert command in out.stdout
