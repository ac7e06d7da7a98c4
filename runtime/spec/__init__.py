"""Layer 2, what a network is: the model config and the processes (DiT's diffusion, SiT's transport),
the families, the condition kinds, the tensor specs of each network, the quantization recipe and the
manifest's value rules as data (manifest_schema.json). Imports only `core`."""
