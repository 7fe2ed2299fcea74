"""Flower's deployment engine on loopback, driven by bench/transfer.py (see deployment.py)."""
