"""prunedm's benchmarks: every row is measured side by side with its baseline in the same run."""
