"""Layer 6, the jobs built on the library: step-level batching (the server's scheduler), generate runs
(shards, workers, resume), quality reports and plots, parity checks, the TensorRT build, and the
output policy of the commands. Nothing below imports a job."""
