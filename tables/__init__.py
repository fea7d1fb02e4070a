"""Table specs (TOML), one per table of the paper."""
