"""Trace-driven simulator: CloudSim-faithful and realistic energy models, same decide() as the arbiter."""

from .engine import RealisticParams, Result, Simulation
from .main import simulate
from .policies import POLICY_NAMES, make_policy

__all__ = ["POLICY_NAMES", "RealisticParams", "Result", "Simulation", "make_policy", "simulate"]
