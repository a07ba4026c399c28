"""Structured pruning: coupled heads, channels and blocks; importance, allocation, shrinking, saving."""
