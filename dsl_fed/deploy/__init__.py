"""Deployment conveniences around Flower's own runtime: node folders, certificates and keys, a loopback federation.

Nothing here imports Flower; the loopback federation drives Flower's executables.
"""
