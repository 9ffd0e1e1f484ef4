"""Control flow: the protocol loop, one epoch of training, evaluation, checkpoints."""
