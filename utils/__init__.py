"""Shared by every codec script: data, command line, training, bitstream, metrics, RD points.

Nothing in here imports a model script. Model scripts import `utils` before TensorFlow so that the
setting below takes effect before TensorFlow's C++ start-up messages are printed.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
