"""Benchmarks: records, the MLLMU-Bench parquet reader/writer, the miniature benchmark, image pools."""
