"""tools/bench: graftfs measured side by side with native ext4 and mergerfs (see tools/bench)."""
