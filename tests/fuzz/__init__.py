"""A mutation fuzzer for the loractl command line (``python -m tests.fuzz --help``; see README.md)."""
