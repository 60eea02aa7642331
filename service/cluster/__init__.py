"""Several processes on one database (and maybe one Redis): who is alive, and their identity."""
