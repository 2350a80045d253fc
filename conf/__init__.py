"""kdpipe's Hydra config groups, shipped inside the package as kdpipe.conf."""
