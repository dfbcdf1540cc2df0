"""Unit tests of trainer/model/: routing, experts, the CTC model and the objective."""
