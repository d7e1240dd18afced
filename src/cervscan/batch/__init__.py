"""The nightly batch: incremental, crash-safe, locked screening of a growing folder of visits."""
