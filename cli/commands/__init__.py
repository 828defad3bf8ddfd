"""The ``saereg`` command line: one module per command group, above every layer it drives.

Command modules import only click (and each other's small helpers in :mod:`.options`) at module
level; the library is imported inside each command, so ``saereg --help`` stays light. Typed
library errors become exit codes in :mod:`.main` and nowhere else.
"""
