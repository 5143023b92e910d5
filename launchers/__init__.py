"""Command-line entry points (thin: parse config, build pieces, hand to the trainer)."""
