"""The package surface: curated names, light imports, a working console entry point."""

from __future__ import annotations

import subprocess
import sys

import p2pfl


def test_public_surface_is_curated():
    """Only the listed names are public; private helpers stay private."""
    public = {n for n in dir(p2pfl) if not n.startswith("_")}
    assert set(p2pfl.__all__) - {"__version__"} <= public
    assert "_runtime" not in p2pfl.__all__
    assert p2pfl.load_scenario is not None and p2pfl.Scenario().peers == 8


def test_cli_import_does_not_load_heavy_modules():
    """`import p2pfl.cli` must not import JAX, matplotlib or rich: peers pay for what they use."""
    code = (
        "import sys, p2pfl.cli; "
        "print(','.join(m for m in ('jax', 'matplotlib', 'rich', 'optax', 'sklearn') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_peer_path_does_not_import_plotting():
    """The peer's modules need JAX but not matplotlib or scikit-learn (structlog pulls in rich)."""
    code = (
        "import sys, p2pfl.peer; "
        "print(','.join(m for m in ('matplotlib', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_console_help_lists_the_commands():
    """`python -m p2pfl --help` names every subcommand."""
    out = subprocess.run(
        [sys.executable, "-m", "p2pfl", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("launch", "peer", "topology"):
        assert command in out.stdout
