"""Enersis power service."""
