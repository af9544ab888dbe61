"""meshxl: high availability for Envoy service meshes."""

__version__ = "0.1.0"
