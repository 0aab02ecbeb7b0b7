"""Launchers of the compiled kernels. Importing this package imports nothing compiled."""
