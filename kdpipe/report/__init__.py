"""Human-readable summaries of a pipeline run."""
