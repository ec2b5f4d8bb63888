import sys

from ddp_demo.doctor.cli import main

sys.exit(main())
