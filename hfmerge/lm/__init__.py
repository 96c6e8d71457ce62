"""Language models through `transformers`: the only layer that loads them. Text data, token
windows, probe batches, hidden states and token loss."""
