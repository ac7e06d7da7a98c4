"""The ditrt version: a run record, an engine's manifest entry and the CLI report it."""
__version__ = "0.3.0"
