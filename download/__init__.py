"""download stage: imagery and labels from S3 or an S3-compatible store into data/."""
