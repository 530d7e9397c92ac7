"""The RWKV language model, usable with no image in sight: the RWKV-7 decoder (GPT and RNN modes), its
recurrent state, checkpoints (official .pth and our folders), tokenizers, sampling, generation and the
CUDA-graph runners of RNN mode."""
