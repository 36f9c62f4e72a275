"""Attacks: the paper grid's presets and the portfolio's cascade components."""
