"""Baselines beside TIGER, each one chapter on TIGER's own protocol: sasrec.py."""
