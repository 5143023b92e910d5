"""GeoTIFF/PNG/JPEG archives -> WebDataset tar shards with a manifest."""
