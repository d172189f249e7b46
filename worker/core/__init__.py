"""Shared by every wing: frozen settings, logging, stop signals, memory release, the
Prometheus registry and the worker's root errors. Imports nothing from the other wings."""
