"""Arithmetic about models and runs: parameter and FLOP counts from a config."""
