"""mlxmoe: one Mixture-of-Experts LLM across the Macs you own.

Layers, lowest first (docs/ARCHITECTURE.md draws them): bundle -> model ->
node -> cluster -> ui, with quality beside node and the commands on top; a
layer never imports one above it.
"""

from pathlib import Path

__version__ = "0.1.0"

ASSETS = Path(__file__).resolve().parent / "assets"  # the bundled model, suites, presets: ship in the wheel
