"""split stage: chips and masks into train/val(/test) folders."""
