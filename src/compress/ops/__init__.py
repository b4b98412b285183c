"""Model → model operations and measurements: UPop surgery helpers, low-rank, head and Fisher pruning,
token masking, text-layer dropping, calibration gradients, distillation losses, profiling."""
