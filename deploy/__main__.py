import sys

from neurohand.deploy.cli import main

sys.exit(main())
