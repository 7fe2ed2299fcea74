"""`python -m worker` runs `tspace-worker`."""

from worker.cli import main

main()
