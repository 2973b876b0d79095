"""Shared by every stage: settings, data tree, raster and vector I/O, errors, CLI."""
