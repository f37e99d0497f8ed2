"""Readers for model file formats (what a model is made of), independent of where it came from."""
