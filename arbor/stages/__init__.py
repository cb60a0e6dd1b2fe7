"""One module per `arbor <stage>` command (see arbor/cli.py)."""
