"""Models the package ships: the digits teacher and the digits classifier (FID features)."""
