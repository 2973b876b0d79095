"""flatten: chips and masks into one pixel table; flatten.table is its format, which summarize and ml read."""
