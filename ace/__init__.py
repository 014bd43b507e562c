"""ace: train any PyTorch model under equivariance constraints by constrained optimisation."""
