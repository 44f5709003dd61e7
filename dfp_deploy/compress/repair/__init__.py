"""Closed-form repair of pruned and quantized channels (Neuron Merging, UDFC, lmmse), folded into the consumers."""
