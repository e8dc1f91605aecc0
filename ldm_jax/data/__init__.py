"""Offline datasets (TFDS array_record builders) and the grain input pipeline."""
