"""What a finished job gives: export, evaluation, the report, method comparison, benchmarks."""
