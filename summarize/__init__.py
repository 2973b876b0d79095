"""summarize: band statistics and histograms of the flat table (or of chips)."""
