import sys

from asyncsync.cli import main

sys.exit(main())
