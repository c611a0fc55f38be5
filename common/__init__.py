"""The message contract, broker topology, configuration and broker plumbing shared by every service."""
