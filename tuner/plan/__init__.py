"""Predicting before measuring: memory per device, llama.cpp as oracle, the roofline, speed, what-if quants, the
probe; `estimate` puts them together as `tuner estimate` plans (tuner.plan.estimate)."""
