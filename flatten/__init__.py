"""flatten: chips and masks into one pixel table."""
