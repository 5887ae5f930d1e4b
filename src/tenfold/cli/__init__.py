"""The `tenfold` command (Typer + Rich)."""
