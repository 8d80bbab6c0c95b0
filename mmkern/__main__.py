import sys

from mmkern.cli import main

sys.exit(main())
