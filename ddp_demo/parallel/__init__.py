"""Data-parallel machinery written out by hand, each piece tested against torch's own."""
