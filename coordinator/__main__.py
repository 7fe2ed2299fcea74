"""`python -m coordinator` runs `tspace-coord`."""

from coordinator.cli import main

main()
