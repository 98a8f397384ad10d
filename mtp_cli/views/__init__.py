"""Rich renderings for the CLI (the CLI parses, calls the library, renders)."""
