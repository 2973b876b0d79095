"""mask stage: polygon labels into uint8 0/255 masks, one per chip."""
