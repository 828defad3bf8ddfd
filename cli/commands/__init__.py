"""The ``saereg`` command line: one module per command group, above every layer it drives.

Command modules import only click, the shared helpers in :mod:`.options` and light saereg
modules at module level, never each other; the library is imported inside each command, so
``saereg --help`` stays light. :mod:`.main` imports every command module and assembles the tree;
typed library errors become exit codes there and nowhere else.
"""
