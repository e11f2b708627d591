"""Probes: the registry of types, cross-validation with Ray Tune, portable artifacts."""
from guardray.probes.artifact import load

__all__ = ["load"]
