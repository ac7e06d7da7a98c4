"""Layer 1, the foundation: errors, scalar validators, files and atomic writes, portable float operations,
progress lines, image encoding and the version. Knows nothing of models; imports no other layer."""
