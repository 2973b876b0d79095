"""evaluate stage: predictions against the truth masks, pixel and object scores, summary and report."""
