"""The `mtp` commands, one module per concern; `mtp_cli.cli` assembles them into the app.

Each command parses, calls one library function and renders; `UserError` becomes exit 2.
"""
