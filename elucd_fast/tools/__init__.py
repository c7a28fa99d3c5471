"""Tools around the samplers: the per-step cost profiler (with GPU telemetry), the calibration
analysis (ECE, ICE), the paper's ablation on the digits benchmark, and their charts."""
