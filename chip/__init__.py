"""chip stage: a raster into fixed-size, georeferenced chips."""
