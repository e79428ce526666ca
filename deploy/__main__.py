import sys

from neurohand.deploy.cli.main import main

sys.exit(main())
