import sys

from sb3_metarl.cli import main

sys.exit(main())
