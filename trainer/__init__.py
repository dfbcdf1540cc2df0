"""Omni-Router: mixture-of-experts CTC speech recognition with one router shared by all MoE layers."""
