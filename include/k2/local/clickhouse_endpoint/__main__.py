"""`python -m k2.local.clickhouse_endpoint --host ... --port ... --data-path ...`"""

import sys

from .server import main

sys.exit(main())
