"""Operator tools: publish commands and read the cluster state from the bus."""
