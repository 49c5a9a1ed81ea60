import torch

# One intra-op thread: the suite runs on 2 shared cores and the DDP tests start 2 processes;
# more threads oversubscribe the cores and make every test slower.
torch.set_num_threads(1)
