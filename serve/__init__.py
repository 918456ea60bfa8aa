"""Ray Serve endpoints for BoN and DeRa decoding (deployments composed with handles and .bind()); built in later issues."""
