"""Enersis arbiter service."""
