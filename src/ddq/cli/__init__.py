"""The ``ddq`` command line."""
