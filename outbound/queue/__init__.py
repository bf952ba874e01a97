"""The local queue: a crash-safe spool, the retry scheduler and DSN bounces (issue #6)."""
