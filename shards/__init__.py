"""GeoTIFF/PNG/JPEG archives -> WebDataset tar shards with a manifest (see shards/convert.py)."""

__version__ = "0.1.0"
