"""Test-wide settings: one intra-op thread. The tests run tiny models on tiny batches, where
extra threads only add synchronisation (and, on a shared 2-core machine, oversubscription
made the same clone 15x slower)."""
import torch

torch.set_num_threads(1)
