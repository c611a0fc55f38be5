"""Trace-driven simulator: CloudSim-faithful and realistic energy models, same decide() as the arbiter."""
