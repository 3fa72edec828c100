"""Recipes that regenerate the shipped files in ``data/`` (``make data``)."""
