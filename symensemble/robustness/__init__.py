"""Robustness evaluation: config → targets → plan → runner (per-image flags) → records → report.

``evaluate`` (in :mod:`.evaluation`) is the one entry point; attacks live in :mod:`.attacks`.
"""
