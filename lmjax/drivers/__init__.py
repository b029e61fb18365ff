"""Drivers that run training many times: sweeps (`lmjax sweep`) and the µP coordinate check.

They sit above `lmjax.train` (they call it) and below the CLI; `lmjax.scaling` below them
only counts, plans and fits.
"""
