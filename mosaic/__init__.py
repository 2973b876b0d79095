"""mosaic stage: a folder of tiles into one GeoTIFF."""
