"""Enersis: energy-saving consolidation for libvirt/KVM and Xen clusters."""

__version__ = "0.1.0"
