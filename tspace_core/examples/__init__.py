"""Bundled example jobs (package data)."""
