"""Metrics: shapes checker, bits/dim, FID, CLIP score."""
