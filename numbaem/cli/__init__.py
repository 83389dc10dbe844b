"""The ``numbaem`` command line: one module per command, each with ``add_args(parser)`` and ``main(args)``."""
