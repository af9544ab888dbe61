"""The local toolkit: what runs meshxl on this machine, drives it and reports on it."""
