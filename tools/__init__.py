"""Developer tools that are neither tests nor benchmarks (run from the repository root)."""
