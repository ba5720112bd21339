"""App factory, lifespan, shared HTTP plumbing and the background job runner."""
