"""The EAGLE-3 draft: its head (fc fusion of the aux states, decoder layer, norm, Vd output head) and its vocabulary."""
