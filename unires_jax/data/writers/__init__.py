"""Writers of the raw dataset layouts (for tests, benchmarks and the ShapesParts demo data)."""
