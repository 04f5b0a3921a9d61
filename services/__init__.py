"""The hybridmoe daemons and the ``hybridmoe`` command line."""
