"""Predicting before measuring: memory per device, llama.cpp as oracle, the roofline, speed, what-if quants, the probe."""
