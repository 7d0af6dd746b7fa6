"""``python -m ryzlab``: the same CLI as ``ryzlab`` (what ``torchrun -m ryzlab generate ...`` runs)."""
import sys

from ryzlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
