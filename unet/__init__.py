"""The U-Net: data generator, model, losses, metrics, bundle, training."""

import os

# TensorFlow's C++ start-up messages (oneDNN, CPU features) are noise for users; a user's setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
