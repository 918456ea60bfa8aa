"""The embedded default task: the demo and test bed (a tiny GPT-2 pi_0 with VADER as the gold reward)."""
