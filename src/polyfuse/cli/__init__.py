"""The `polyfuse` command line (typer)."""
