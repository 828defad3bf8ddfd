"""``python -m saereg``: the ``saereg`` command (also how Lightning's DDP launcher restarts it)."""

from saereg.commands.main import main

if __name__ == "__main__":
    main()
