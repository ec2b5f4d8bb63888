"""Data-parallel machinery written out by hand, each piece tested against torch's own.

Each module here does one thing torch does (or, on the CPU, does not do) in a few lines a
reader can follow, and its tests compare it with torch's implementation or with one process
on the whole batch.
"""
