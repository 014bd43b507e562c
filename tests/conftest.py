"""Suite-wide settings."""

import torch

# The tests run tiny models, for which extra threads only add contention (on a loaded 2-core machine two
# threads made small ops ~15x slower); a test that needs more threads sets them itself.
torch.set_num_threads(1)
