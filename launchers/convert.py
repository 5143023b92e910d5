"""Convert a GeoTIFF/JPEG/PNG archive into tar shards (same as ``geoexplora-convert``).

python launchers/convert.py ARCHIVE --out SHARDS [options]
python launchers/convert.py verify SHARDS
"""

import sys

from shards.convert import main

if __name__ == "__main__":
    sys.exit(main())
