"""One module per training stage (lm, preference, ppo) and the train-step adapters they plug into the loop."""
