"""Peak FLOP/s and memory bandwidth of known accelerators, read by MFU (`lmjax.train.metrics`),
`lmjax plan` and the benchmarks."""

# Dense peak FLOP/s per device (bfloat16 / float32 matmul), from the vendors' data sheets.
PEAK_FLOPS = {
    "H100": {"bfloat16": 989e12, "float32": 494e12},  # SXM; fp32 via TF32 tensor cores
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},
}

# Peak memory bandwidth per device (bytes/s), from the vendors' data sheets.
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
