"""Training internals: the Trainer subclass, callbacks, checkpoint saving."""
