"""Unit tests of trainer/runtime/: process-group rules, placement, host syncs."""
