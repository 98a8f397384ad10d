"""Launching `mtp train`: checks, the elastic launcher, the worker entry point, fault points."""
