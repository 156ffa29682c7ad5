"""The embedded demo model, its corpus and training scripts."""
