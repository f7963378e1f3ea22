"""Shared fixtures. TensorFlow is kept to the 2 cores CI has, and quiet."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")
