"""train stage: fit a U-Net or a classical model and save a model bundle."""
