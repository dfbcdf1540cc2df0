"""Unit tests of the command-line tools (tools/), called as functions."""
