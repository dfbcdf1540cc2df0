"""Unit tests of trainer/data/: sources, audio, batches, features, effects and augmentation."""
