"""Layer 3, the math of sampling over plain arrays: schedules, DiT's samplers and DPM-Solver++, SiT's
flow loops, the seeded noise stream and its prefetch, and the request value objects (`SampleSpec`,
`LoadOptions`). Imports `core` and `spec`."""
