"""Small dataset sizes shared by the tests (no side effects: safe to import from subprocess configs)."""
SMALL_SHAPES = dict(image_size=32, train_size=600, test_size=200, heldout_size=120)
