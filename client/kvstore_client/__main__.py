"""`python -m kvstore_client`: the `kvstore` command."""
import sys

from .cli import main

sys.exit(main())
