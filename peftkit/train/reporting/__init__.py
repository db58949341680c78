"""What a run tells: metrics.jsonl, the loss curve and the progress bar (`metrics`), experiment trackers
(`tracking`: --report-to), and the memory estimate printed before training (`memory_report`)."""
