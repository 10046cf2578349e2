"""Measuring methods against each other: ``atm compare`` (accuracy and FLOPs, one ``atm validate``
run per row) and ``atm benchmark`` (throughput next to the FLOPs ratio)."""
