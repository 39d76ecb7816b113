"""Searching: the space, the loop over a ledger, confirmation, the context ladder, the recommendation, the fleet."""
