"""Classical per-pixel models: features, random forest, logistic regression, bundle, training."""
