"""The one-machine demo cluster and its live view."""
