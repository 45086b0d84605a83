"""Datasets and task samplers: synthetic tasks, files shipped in packages, label noise, batching.

Modules are imported explicitly (``from metafit.data import text, noise``) so that
importing one data family never loads another's dependencies.
"""
