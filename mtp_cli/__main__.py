"""`python -m mtp_cli` = the `mtp` command."""

from mtp_cli.cli import main

main()
