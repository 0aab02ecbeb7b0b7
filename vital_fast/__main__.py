import sys

from vital_fast.cli.main import main

sys.exit(main())
