"""The command lines: shared option groups (`options`) and one module per entry point."""
