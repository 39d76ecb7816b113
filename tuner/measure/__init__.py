"""Measuring one config: the trial record's store, the worker and its runner, memory limits, the lock, the hardware."""
