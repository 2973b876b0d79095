"""predict stage: masks, probabilities and roof polygons from a model bundle."""
