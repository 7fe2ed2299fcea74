"""Catalogue schema revisions, oldest first; a package so that installs ship it."""
