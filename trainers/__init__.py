"""hpctrain trainers: everything that runs inside a training process."""
