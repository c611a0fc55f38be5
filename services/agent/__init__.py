"""Enersis agent service."""
