"""Software distribution: packages, artifact store, transfers, deployments and rollouts."""
