import sys

from ddp_demo.train import main

sys.exit(main())
